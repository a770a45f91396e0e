"""kiln.SandboxPool in a real Kiln guest (tier 4): a user never sees the previous one's
changes, and the counters say what happened."""

import pytest

import kiln
from conftest import DEADLINES


def test_pool_hands_out_pristine_sandboxes():
    with kiln.SandboxPool(min_size=1, max_size=1, memory_mib=256, name="pypool",
                          **DEADLINES) as pool:
        assert pool.reset_mode == "restore"
        pool.warm(1)
        with pool.acquire() as sb:
            assert sb.pooled
            default_hostname = sb.run(["hostname"]).stdout_text.strip()
            sb.write("/tmp/secret", "user one")
            sb.run("sleep 1000 </dev/null >/dev/null 2>&1 &")
            sb.run("hostname py-user-a; echo 'export PY_USER_A=1' >> /etc/profile")
            assert sb.run(["hostname"]).stdout_text.strip() == "py-user-a"
            assert "sleep 1000" in sb.run(["ps"]).stdout_text
            first = sb.name
        assert sb.closed
        with pytest.raises(kiln.SandboxClosedError):
            sb.exists("/tmp/secret")
        with pool.acquire(timeout=300) as sb2:
            assert sb2.name != first
            assert not sb2.exists("/tmp/secret")
            assert "sleep 1000" not in sb2.run(["ps"]).stdout_text
            assert sb2.run(["hostname"]).stdout_text.strip() == default_hostname
            assert "PY_USER_A" not in sb2.run("cat /etc/profile 2>/dev/null; true").stdout_text
        s = pool.stats()
        assert isinstance(s, kiln.PoolStats)
        assert s.hit_count + s.miss_count == 2 and s.hit_count >= 1, s
        assert s.created_count >= 2, s
    with pytest.raises(kiln.PoolClosedError):
        pool.acquire()
