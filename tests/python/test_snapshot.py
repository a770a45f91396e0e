"""snapshot / restore / fork from Python in a real Kiln guest (tier 4)."""

import kiln
from conftest import DEADLINES, config


def test_snapshot_restore_and_fork(tmp_path):
    with kiln.Sandbox(**config("py-snap")) as sb:
        sb.write("/tmp/state", "before")
        info = sb.snapshot(tmp_path / "snap")
        assert isinstance(info, kiln.SnapshotInfo)
        assert info.written_bytes > 0 and info.guest_bytes >= 256 << 20
        sb.write("/tmp/state", "after")  # the original keeps running
        with kiln.Sandbox.restore(tmp_path / "snap", name="py-restored", **DEADLINES) as r:
            assert r.read("/tmp/state") == b"before"
            assert r.run(["echo", "restored"]).stdout == b"restored\n"
        forks = sb.fork(2, **DEADLINES)
        try:
            assert [f.name for f in forks] == ["py-snap-fork0", "py-snap-fork1"]
            assert all(f.read("/tmp/state") == b"after" for f in forks)
            forks[0].write("/tmp/state", "fork0")
            assert forks[1].read("/tmp/state") == b"after"
            assert sb.read("/tmp/state") == b"after"
        finally:
            for f in forks:
                f.shutdown()
