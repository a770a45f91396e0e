"""files through the e2b SDK against kiln serve: text and 5 MB binary round trips, several
files at once, list, exists, remove, rename, make_dir, get_info."""

import hashlib
import os

import pytest
from e2b import FileType, NotFoundException


def test_text_round_trip(sbx):
    info = sbx.files.write("/tmp/t/hello.txt", "hello kiln\n")
    assert info.path == "/tmp/t/hello.txt"
    assert sbx.files.read("/tmp/t/hello.txt") == "hello kiln\n"
    # The guest sees the same bytes.
    assert sbx.commands.run("cat /tmp/t/hello.txt").stdout == "hello kiln\n"


def test_binary_5mb_round_trip(sbx):
    data = os.urandom(5 * 1024 * 1024)
    sbx.files.write("/tmp/big.bin", data)
    back = sbx.files.read("/tmp/big.bin", format="bytes")
    assert bytes(back) == data
    r = sbx.commands.run("sha256sum /tmp/big.bin")
    assert r.stdout.split()[0] == hashlib.sha256(data).hexdigest()


def test_write_several_and_list(sbx):
    infos = sbx.files.write_files(
        [
            {"path": "/tmp/many/a.txt", "data": "A"},
            {"path": "/tmp/many/b.txt", "data": b"BB"},
            {"path": "/tmp/many/sub/c.txt", "data": "CCC"},
        ]
    )
    assert [i.path for i in infos] == ["/tmp/many/a.txt", "/tmp/many/b.txt", "/tmp/many/sub/c.txt"]
    names = sorted(e.name for e in sbx.files.list("/tmp/many"))
    assert names == ["a.txt", "b.txt", "sub"]
    deep = sorted(e.path for e in sbx.files.list("/tmp/many", depth=2))
    assert "/tmp/many/sub/c.txt" in deep
    b = [e for e in sbx.files.list("/tmp/many") if e.name == "b.txt"][0]
    assert b.type == FileType.FILE and b.size == 2


def test_exists_remove_rename_make_dir_get_info(sbx):
    sbx.files.write("/tmp/x/f.txt", "12345")
    assert sbx.files.exists("/tmp/x/f.txt")
    assert not sbx.files.exists("/tmp/x/nope")
    info = sbx.files.get_info("/tmp/x/f.txt")
    assert info.type == FileType.FILE and info.size == 5 and info.name == "f.txt"
    moved = sbx.files.rename("/tmp/x/f.txt", "/tmp/x/g.txt")
    assert moved.path == "/tmp/x/g.txt"
    assert not sbx.files.exists("/tmp/x/f.txt")
    assert sbx.files.read("/tmp/x/g.txt") == "12345"
    assert sbx.files.make_dir("/tmp/x/d/e") is True
    assert sbx.files.make_dir("/tmp/x/d/e") is False
    assert sbx.files.get_info("/tmp/x/d/e").type == FileType.DIR
    sbx.files.remove("/tmp/x/g.txt")
    assert not sbx.files.exists("/tmp/x/g.txt")
    sbx.files.remove("/tmp/x/g.txt")  # missing: still fine
    with pytest.raises(NotFoundException):
        sbx.files.read("/tmp/x/g.txt")
    with pytest.raises(NotFoundException):
        sbx.files.get_info("/tmp/x/g.txt")


def test_watch_dir_reports_create_write_remove(sbx):
    from e2b import FilesystemEventType

    sbx.files.make_dir("/tmp/watched")
    sbx.files.write("/tmp/watched/old.txt", "1")
    h = sbx.files.watch_dir("/tmp/watched")
    sbx.files.write("/tmp/watched/new.txt", "x")
    sbx.files.write("/tmp/watched/old.txt", "longer")
    got = {(e.name, e.type) for e in h.get_new_events()}
    assert ("new.txt", FilesystemEventType.CREATE) in got
    assert ("old.txt", FilesystemEventType.WRITE) in got
    sbx.files.remove("/tmp/watched/new.txt")
    got = {(e.name, e.type) for e in h.get_new_events()}
    assert got == {("new.txt", FilesystemEventType.REMOVE)}
    assert h.get_new_events() == []
    h.stop()
