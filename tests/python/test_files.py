"""Sandbox file methods in a real Kiln guest (tier 4)."""

import io
import pathlib

import pytest

import kiln


def test_write_read_bytes_str_and_pathlike(sb):
    assert sb.write("/tmp/a.bin", b"\x00\x01binary") == 8
    assert sb.read("/tmp/a.bin") == b"\x00\x01binary"
    sb.write(pathlib.PurePosixPath("/tmp/b.txt"), "h\u00e9llo")
    assert sb.read_text(b"/tmp/b.txt") == "h\u00e9llo"
    sb.write("/tmp/c.bin", bytearray(b"ba"))
    sb.write("/tmp/d.bin", memoryview(b"xmvx")[1:3])
    assert sb.read("/tmp/c.bin") + sb.read("/tmp/d.bin") == b"bamv"
    big = bytes(range(256)) * 16384  # 4 MiB from a file object
    assert sb.write("/tmp/big.bin", io.BytesIO(big)) == len(big)
    assert sb.read("/tmp/big.bin") == big
    # The guest sees what was written.
    assert sb.run(["cat", "/tmp/b.txt"]).stdout == "h\u00e9llo".encode()


def test_mkdir_list_stat_exists_rename_remove(sb):
    sb.mkdir("/tmp/tree/sub/deeper")
    sb.write("/tmp/tree/f.txt", "12345")
    entries = sb.list("/tmp/tree")
    assert [(e.name, e.kind) for e in entries] == [("f.txt", "file"), ("sub", "dir")]
    assert entries[0].size == 5
    st = sb.stat("/tmp/tree/f.txt")
    assert (st.kind, st.size) == ("file", 5)
    assert st.mode & 0o600 == 0o600 and st.mtime > 1e9
    assert sb.stat("/tmp/tree").kind == "dir"
    assert sb.exists("/tmp/tree/f.txt") and not sb.exists("/tmp/tree/none")
    sb.rename("/tmp/tree/f.txt", "/tmp/tree/g.txt")
    assert not sb.exists("/tmp/tree/f.txt") and sb.read("/tmp/tree/g.txt") == b"12345"
    with pytest.raises(kiln.GuestError) as ei:
        sb.remove("/tmp/tree")  # not empty
    assert ei.value.guest_kind == "DirectoryNotEmpty"
    sb.remove("/tmp/tree/g.txt")
    sb.remove("/tmp/tree", recursive=True)
    assert not sb.exists("/tmp/tree")


def test_missing_files_raise_not_found(sb):
    with pytest.raises(kiln.NotFoundError) as ei:
        sb.read("/no/such/file")
    e = ei.value
    assert isinstance(e, FileNotFoundError) and isinstance(e, kiln.KilnError)
    assert e.op == "read_file" and e.guest_kind == "NotFound" and e.vm == sb.name
    assert "/no/such/file" in str(e)
    with pytest.raises(FileNotFoundError):
        sb.stat("/no/such/file")
    with pytest.raises(TypeError):
        sb.read(42)
