"""Sandbox lifetime through the e2b SDK against kiln serve: list with metadata, set_timeout,
get_info, connect, is_running, isolation of two sandboxes, a wrong access token, kill (later
calls fail as the SDK expects) and a deadline that kills."""

import os
import time

import httpx
import pytest
from e2b import Sandbox, SandboxQuery, SandboxException
from e2b.exceptions import NotFoundException

from conftest import create


def test_two_sandboxes_list_connect_isolation_token_and_kill():
    a = create(timeout=600, metadata={"who": "a"})
    b = create(timeout=600, metadata={"who": "b"})
    try:
        assert a.sandbox_id != b.sandbox_id
        assert a.is_running() and b.is_running()

        # list, filtered by metadata, and paged
        ids = [s.sandbox_id for s in Sandbox.list(query=SandboxQuery(metadata={"who": "a"})).next_items()]
        assert ids == [a.sandbox_id]
        p = Sandbox.list(limit=1)
        first = p.next_items()
        assert len(first) == 1 and p.has_next
        second = p.next_items()
        assert {first[0].sandbox_id, second[0].sandbox_id} == {a.sandbox_id, b.sandbox_id}

        # set_timeout moves endAt
        before = a.get_info().end_at
        a.set_timeout(1200)
        assert a.get_info().end_at > before

        # isolation: files and processes of one are not visible in the other
        a.files.write("/tmp/only-a", "a")
        assert a.files.exists("/tmp/only-a")
        assert not b.files.exists("/tmp/only-a")
        h = a.commands.run("sleep 500", background=True, timeout=0)
        assert h.pid in [x.pid for x in a.commands.list()]
        assert h.pid not in [x.pid for x in b.commands.list()]
        assert b.commands.kill(h.pid) is False
        h.kill()

        # connect gives a working handle
        c = Sandbox.connect(a.sandbox_id)
        assert c.commands.run("cat /tmp/only-a").stdout == "a"

        # a wrong access token is refused (raw envd request: b's token on a)
        url = os.environ["E2B_SANDBOX_URL"]
        r = httpx.get(
            url + "/files",
            params={"path": "/tmp/only-a"},
            headers={"E2b-Sandbox-Id": a.sandbox_id, "E2b-Sandbox-Port": "49983",
                     "X-Access-Token": b._envd_access_token or "x"},
        )
        assert r.status_code == 401

        # kill: the handle reports not running, later calls fail
        assert a.kill() is True
        assert not a.is_running()
        with pytest.raises(SandboxException):
            a.commands.run("true")
        assert Sandbox.kill(a.sandbox_id) is False
        with pytest.raises(NotFoundException):
            Sandbox.get_info(a.sandbox_id)
        assert b.is_running()
    finally:
        a.kill()
        b.kill()


def test_deadline_kills_the_sandbox():
    s = create(timeout=20)
    try:
        assert s.commands.run("echo up").stdout == "up\n"
        deadline = time.monotonic() + 60
        while s.is_running() and time.monotonic() < deadline:
            time.sleep(1)
        assert not s.is_running()
    finally:
        s.kill()
