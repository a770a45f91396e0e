"""commands.run through the e2b SDK against kiln serve: output, exit codes, env, cwd,
streaming callbacks, background + kill, stdin, timeouts."""

import time

import pytest
from e2b import CommandExitException, TimeoutException


def test_run_stdout_and_exit_code(sbx):
    r = sbx.commands.run("echo hello; echo oops >&2")
    assert r.exit_code == 0
    assert r.stdout == "hello\n"
    assert r.stderr == "oops\n"


def test_nonzero_exit_raises_with_code_and_stderr(sbx):
    with pytest.raises(CommandExitException) as ei:
        sbx.commands.run("echo bad >&2; exit 3")
    assert ei.value.exit_code == 3
    assert "bad" in ei.value.stderr


def test_envs_user_home_and_cwd(sbx):
    r = sbx.commands.run('echo "$FOO|$KILN_SBX_ENV"', envs={"FOO": "bar"})
    assert r.stdout == "bar|from-create\n"
    r = sbx.commands.run("whoami; pwd; echo $HOME")
    assert r.stdout == "user\n/home/user\n/home/user\n"
    r = sbx.commands.run("pwd", cwd="/tmp")
    assert r.stdout == "/tmp\n"


def test_streaming_callbacks_in_order(sbx):
    seen = []
    r = sbx.commands.run(
        "for i in 1 2 3; do echo line$i; sleep 0.3; done; echo e >&2",
        on_stdout=lambda s: seen.append(("out", s)),
        on_stderr=lambda s: seen.append(("err", s)),
    )
    out = "".join(s for k, s in seen if k == "out")
    assert out == "line1\nline2\nline3\n" == r.stdout
    assert seen[-1] == ("err", "e\n")
    # Incremental: three separate stdout events (0.3 s apart).
    assert len([1 for k, _ in seen if k == "out"]) >= 3


def test_background_list_and_kill(sbx):
    h = sbx.commands.run("sleep 1000", background=True, timeout=0)
    assert h.pid > 0
    pids = [p.pid for p in sbx.commands.list()]
    assert h.pid in pids
    listed = [p for p in sbx.commands.list() if p.pid == h.pid][0]
    assert listed.args[-1] == "sleep 1000"
    assert h.kill() is True
    with pytest.raises(CommandExitException) as ei:
        h.wait()
    assert ei.value.exit_code == -1
    assert h.pid not in [p.pid for p in sbx.commands.list()]
    assert sbx.commands.kill(h.pid) is False


def test_stdin_send_and_close(sbx):
    h = sbx.commands.run("cat", background=True, stdin=True)
    h.send_stdin("hi there\n")
    sbx.commands.send_stdin(h.pid, b"second\n")
    h.close_stdin()
    r = h.wait()
    assert r.stdout == "hi there\nsecond\n"


def test_timeout_kills_the_command(sbx):
    t0 = time.monotonic()
    with pytest.raises(TimeoutException):
        sbx.commands.run("sleep 100", timeout=3)
    assert time.monotonic() - t0 < 30
    # The process is gone soon after the deadline.
    for _ in range(50):
        running = [p for p in sbx.commands.list() if p.args and p.args[-1] == "sleep 100"]
        if not running:
            break
        time.sleep(0.2)
    assert not running
    r = sbx.commands.run("cat /proc/[0-9]*/comm 2>/dev/null | grep -x sleep || echo none")
    assert r.stdout.strip() == "none"
