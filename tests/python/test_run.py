"""Sandbox.run / stream / errors / threads / asyncio in a real Kiln guest (tier 4)."""

import asyncio
import io
import threading
import time

import pytest

import kiln
import kiln.aio
from conftest import config


def test_run_argv_and_shell_line(sb):
    r = sb.run(["echo", "hello", "kiln"])
    assert isinstance(r, kiln.Result)
    assert r.ok and r.exit_code == 0 and r.signal is None
    assert r.stdout == b"hello kiln\n" and r.stderr == b""
    assert r.stdout_text == "hello kiln\n"
    r = sb.run("echo out; echo err >&2; exit 3")
    assert (r.exit_code, r.stdout, r.stderr, r.returncode) == (3, b"out\n", b"err\n", 3)
    assert not r.ok and not r.timed_out and not r.truncated


def test_env_cwd_and_stdin(sb):
    r = sb.run(
        ["sh", "-c", 'echo "$GREETING"; pwd; cat'],
        env={"GREETING": "hi from python"},
        cwd="/tmp",
        stdin="some input",
    )
    assert r.stdout_text.splitlines() == ["hi from python", "/tmp", "some input"]
    assert sb.run(["cat"], stdin=b"\x00\xffbytes").stdout == b"\x00\xffbytes"
    big = bytes(range(256)) * 4096  # 1 MiB: streamed in chunks
    r = sb.run(["sha256sum"], stdin=io.BytesIO(big))
    import hashlib

    assert r.stdout_text.split()[0] == hashlib.sha256(big).hexdigest()


def test_command_not_found_exits_127(sb):
    r = sb.run(["no-such-command-xyz"])
    assert r.exit_code == 127
    assert b"no-such-command-xyz" in r.stderr
    with pytest.raises(kiln.CommandError) as ei:
        sb.run(["no-such-command-xyz"], check=True)
    assert ei.value.result.exit_code == 127


def test_signal_and_timeout(sb):
    r = sb.run("kill -9 $$")
    assert r.exit_code is None and r.signal == 9 and r.returncode == 137
    t = time.monotonic()
    r = sb.run(["sleep", "100"], timeout=1)
    assert r.timed_out and r.signal == 9
    assert time.monotonic() - t < 60
    with pytest.raises(kiln.CommandTimeout) as ei:
        sb.run(["sleep", "100"], timeout=0.5, check=True)
    assert isinstance(ei.value, TimeoutError) and ei.value.result.timed_out


def test_output_cap_truncates(sb):
    r = sb.run("head -c 100000 /dev/zero", output_cap=1000)
    assert r.truncated and len(r.stdout) <= 1000
    r = sb.run("head -c 100000 /dev/zero", output_cap=None)
    assert not r.truncated and len(r.stdout) == 100000


def test_bad_arguments(sb):
    with pytest.raises(ValueError):
        sb.run([])
    with pytest.raises(TypeError):
        sb.run(["true"], env={"A": 1})
    with pytest.raises(ValueError):
        sb.run(["true"], timeout=-1)
    with pytest.raises(kiln.ExecError):
        sb.run(["true"], cwd="/no/such/dir")


def test_stream_events_in_order(sb):
    s = sb.stream("echo one; sleep 0.2; echo two >&2; echo three; exit 4")
    events = list(s)
    assert events[0].kind == "started" and events[0].pid > 0
    assert events[-1].kind == "exit" and events[-1].exit_code == 4
    out = b"".join(e.data for e in events if e.kind == "stdout")
    err = b"".join(e.data for e in events if e.kind == "stderr")
    assert (out, err) == (b"one\nthree\n", b"two\n")
    assert s.done
    assert next(s, None) is None


def test_stream_kill_from_another_thread(sb):
    s = sb.stream(["sleep", "1000"])
    threading.Timer(0.5, s.kill).start()
    last = list(s)[-1]
    assert last.kind == "exit" and last.signal == 9


def test_threads_run_in_parallel_and_release_the_gil(sb):
    # 8 commands of 2 s each in one sandbox from 8 threads: in parallel they take far less
    # than the 16 s one after the other would.
    results = [None] * 8

    def work(i):
        results[i] = sb.run(f"sleep 2; echo {i}")

    ticks = 0
    stop = threading.Event()

    def count():
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            time.sleep(0.001)

    counter = threading.Thread(target=count)
    counter.start()
    t = time.monotonic()
    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    took = time.monotonic() - t
    stop.set()
    counter.join()
    assert [r.stdout_text for r in results] == [f"{i}\n" for i in range(8)]
    assert took < 12, f"8 x sleep 2 took {took:.1f} s: not run in parallel"
    # The GIL was free while the threads waited on the guest.
    assert ticks > 20, ticks


def test_two_sandboxes_at_once(sb):
    with kiln.Sandbox(**config("py-second")) as other:
        out = {}

        def work(name, s):
            out[name] = s.run(["sh", "-c", "sleep 1; hostname"]).stdout_text.strip()

        ts = [threading.Thread(target=work, args=(n, s)) for n, s in (("a", sb), ("b", other))]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert len(out) == 2
        assert other.run(["echo", "x"]).stdout == b"x\n"
    assert other.closed
    with pytest.raises(kiln.SandboxClosedError):
        other.run(["true"])


def test_asyncio_flavour(sb):
    async def main():
        a = kiln.aio.Sandbox(sb)
        r1, r2 = await asyncio.gather(a.run("sleep 1; echo a"), a.run(["echo", "b"]))
        kinds = [ev.kind async for ev in a.stream(["echo", "s"])]
        await a.write("/tmp/aio.txt", "async")
        return r1.stdout, r2.stdout, kinds, await a.read("/tmp/aio.txt")

    r1, r2, kinds, data = asyncio.run(main())
    assert (r1, r2, data) == (b"a\n", b"b\n", b"async")
    assert kinds[0] == "started" and kinds[-1] == "exit" and "stdout" in kinds


def test_shutdown_kills_running_commands():
    s = kiln.Sandbox(**config("py-shutdown"))
    res = {}

    def work():
        try:
            res["r"] = s.run(["sleep", "1000"])
        except kiln.KilnError as e:
            res["e"] = e

    t = threading.Thread(target=work)
    t.start()
    time.sleep(1)
    t0 = time.monotonic()
    s.shutdown()
    t.join(timeout=60)
    assert not t.is_alive()
    assert time.monotonic() - t0 < 60
    assert ("r" in res and res["r"].signal == 9) or isinstance(res.get("e"), kiln.KilnError)
    assert s.closed and not s.is_running
    s.shutdown()  # idempotent
