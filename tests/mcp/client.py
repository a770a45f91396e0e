"""Drives `kiln mcp` with the real `mcp` Python client (PyPI) through its public API only.

Usage:
  client.py stdio KILN_BINARY   spawns `KILN_BINARY mcp --image python ...` and talks stdio
  client.py http URL            talks streamable HTTP to a running `kiln mcp --http`

One sandbox (the python image): list the tools, create, run_command (stdout, exit code,
stderr, env + cwd), write_file + read_file (text and binary), list_files, run_python,
list_sandboxes, kill_sandbox, then a call on the killed sandbox must be a tool error.
Prints one `ok: ...` line per check and exits non-zero on the first failure.
"""

import asyncio
import base64
import os
import sys
import time

from mcp import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client

TOOLS = {
    "create_sandbox",
    "run_command",
    "run_python",
    "read_file",
    "write_file",
    "list_files",
    "kill_sandbox",
    "list_sandboxes",
}

# Guest boots are slow under nested emulation.
CALL_TIMEOUT = 240.0


def ok(what):
    print(f"ok: {what}", flush=True)


def text(result):
    return "".join(getattr(c, "text", "") for c in result.content)


async def call(session, name, args):
    start = time.monotonic()
    r = await session.call_tool(name, args, read_timeout_seconds=CALL_TIMEOUT)
    print(f"  {name} {time.monotonic() - start:.2f}s", flush=True)
    return r


async def good(session, name, args):
    r = await call(session, name, args)
    assert not r.is_error, f"{name} {args}: tool error: {text(r)}"
    assert r.structured_content is not None, f"{name}: no structured content: {r}"
    return r


async def suite(session):
    init = await session.initialize()
    assert init.server_info.name == "kiln-mcp", init.server_info
    tools = await session.list_tools()
    names = {t.name for t in tools.tools}
    assert names == TOOLS, names
    run = next(t for t in tools.tools if t.name == "run_command")
    assert {"sandbox_id", "command"} <= set(run.input_schema.get("required", [])), run.input_schema
    assert {"stdout", "stderr", "exit_code"} <= set(run.output_schema["properties"]), run.output_schema
    ok("list_tools: 8 tools with input and output schemas")

    r = await good(session, "create_sandbox", {"image": "python", "memory_mib": 256})
    sid = r.structured_content["sandbox_id"]
    assert sid.startswith("sb-"), r.structured_content
    assert r.structured_content["running"] is True, r.structured_content
    ok(f"create_sandbox: {sid}")

    r = await good(session, "run_command", {"sandbox_id": sid, "command": "echo hi"})
    s = r.structured_content
    assert s["stdout"] == "hi\n" and s["exit_code"] == 0 and s["stderr"] == "", s
    assert text(r).startswith("exit code 0\n--- stdout ---\nhi"), text(r)
    ok("run_command: echo hi")

    r = await good(session, "run_command", {"sandbox_id": sid, "command": "exit 3"})
    assert r.structured_content["exit_code"] == 3, r.structured_content
    assert text(r).startswith("exit code 3"), text(r)
    ok("run_command: exit 3 is a result with exit_code 3")

    r = await good(session, "run_command", {"sandbox_id": sid, "command": "echo out; echo oops >&2; exit 1"})
    s = r.structured_content
    assert (s["stdout"], s["stderr"], s["exit_code"]) == ("out\n", "oops\n", 1), s
    assert "--- stderr ---\noops" in text(r), text(r)
    ok("run_command: stderr")

    r = await good(
        session,
        "run_command",
        {"sandbox_id": sid, "command": 'echo "$FOO"; pwd', "env": {"FOO": "bar"}, "cwd": "/tmp"},
    )
    assert r.structured_content["stdout"] == "bar\n/tmp\n", r.structured_content
    ok("run_command: env and cwd")

    r = await good(session, "run_command", {"sandbox_id": sid, "command": "sleep 30", "timeout_secs": 1})
    assert r.structured_content["timed_out"] is True, r.structured_content
    ok("run_command: timeout kills sleep")

    body = "hello\nworld\n"
    r = await good(session, "write_file", {"sandbox_id": sid, "path": "/tmp/mcp/dir/a.txt", "content": body})
    assert r.structured_content["bytes_written"] == len(body), r.structured_content
    r = await good(session, "read_file", {"sandbox_id": sid, "path": "/tmp/mcp/dir/a.txt"})
    s = r.structured_content
    assert (s["content"], s["encoding"], s["size"]) == (body, "utf8", len(body)), s
    blob = bytes(range(256)) * 4
    await good(
        session,
        "write_file",
        {"sandbox_id": sid, "path": "/tmp/mcp/dir/b.bin", "content": base64.b64encode(blob).decode(), "encoding": "base64"},
    )
    r = await good(session, "read_file", {"sandbox_id": sid, "path": "/tmp/mcp/dir/b.bin"})
    s = r.structured_content
    assert s["encoding"] == "base64" and base64.b64decode(s["content"]) == blob, s["encoding"]
    ok("write_file + read_file: text and binary round trips (parent directories created)")

    r = await good(session, "list_files", {"sandbox_id": sid, "path": "/tmp/mcp/dir"})
    entries = {e["name"]: (e["kind"], e["size"]) for e in r.structured_content["entries"]}
    assert entries == {"a.txt": ("file", len(body)), "b.bin": ("file", len(blob))}, entries
    ok("list_files")

    r = await call(session, "read_file", {"sandbox_id": sid, "path": "/tmp/mcp/missing"})
    assert r.is_error, r
    ok(f"read_file of a missing file is a tool error: {text(r)[:80]}")

    r = await good(session, "run_python", {"sandbox_id": sid, "code": "print(6*7)"})
    assert r.structured_content["stdout"] == "42\n" and r.structured_content["exit_code"] == 0, r.structured_content
    r = await good(session, "run_python", {"sandbox_id": sid, "code": "import sys\nsys.exit('bad')"})
    assert r.structured_content["exit_code"] == 1 and "bad" in r.structured_content["stderr"], r.structured_content
    ok("run_python: print(6*7) -> 42, sys.exit -> exit code 1")

    r = await good(session, "list_sandboxes", {})
    assert [x["sandbox_id"] for x in r.structured_content["sandboxes"]] == [sid], r.structured_content
    ok("list_sandboxes")

    r = await good(session, "kill_sandbox", {"sandbox_id": sid})
    assert r.structured_content == {"sandbox_id": sid, "killed": True}, r.structured_content
    r = await call(session, "run_command", {"sandbox_id": sid, "command": "echo hi"})
    assert r.is_error and f'unknown sandbox id "{sid}"' in text(r), (r.is_error, text(r))
    r = await good(session, "list_sandboxes", {})
    assert r.structured_content["sandboxes"] == [], r.structured_content
    ok("kill_sandbox; a call on the killed sandbox is a tool error")


async def main():
    mode, target = sys.argv[1], sys.argv[2]
    if mode == "stdio":
        # The client passes only a safe default environment: hand over Kiln's variables.
        env = {k: v for k, v in os.environ.items() if k.startswith("KILN_") or k == "RUST_LOG"}
        params = StdioServerParameters(
            command=target,
            args=["mcp", "--image", "python", "--max-sandboxes", "2", "--boot-timeout", "180"],
            env=env,
        )
        async with stdio_client(params) as (read, write):
            async with ClientSession(read, write) as session:
                await suite(session)
    elif mode == "http":
        async with streamable_http_client(target) as (read, write):
            async with ClientSession(read, write) as session:
                await suite(session)
    else:
        raise SystemExit(f"unknown mode {mode}")
    print("ALL OK", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
