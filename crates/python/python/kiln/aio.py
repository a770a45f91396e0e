"""asyncio flavour of the kiln API: the same methods as coroutines.

The blocking calls of `kiln.Sandbox` release the GIL, so they run on a thread pool
(`executor()`, 64 threads by default) without blocking the event loop.

    import asyncio, kiln.aio

    async def main():
        async with await kiln.aio.Sandbox.create(memory_mib=256) as sb:
            a, b = await asyncio.gather(sb.run("sleep 1; echo a"), sb.run(["echo", "b"]))
            async for ev in sb.stream(["sh", "-c", "echo out; echo err >&2"]):
                print(ev.kind, ev.data)

    asyncio.run(main())
"""

import asyncio
import concurrent.futures
import functools
import threading
from types import TracebackType
from typing import Any, AsyncIterator, Callable, List, Optional, Type, TypeVar

from . import _native
from ._native import DirEntry, Event, FileStat, PoolStats, Result, SnapshotInfo

__all__ = ["Sandbox", "SandboxPool", "executor", "set_executor"]

T = TypeVar("T")

_lock = threading.Lock()
_executor: Optional[concurrent.futures.Executor] = None


def executor() -> concurrent.futures.Executor:
    """The thread pool the blocking calls run on (created on first use, 64 threads)."""
    global _executor
    with _lock:
        if _executor is None:
            _executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=64, thread_name_prefix="kiln-aio"
            )
        return _executor


def set_executor(ex: concurrent.futures.Executor) -> None:
    """Runs the blocking calls on `ex` from now on."""
    global _executor
    with _lock:
        _executor = ex


async def _call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(executor(), functools.partial(fn, *args, **kwargs))


class Sandbox:
    """An async handle on a `kiln.Sandbox`; make one with `await Sandbox.create(...)`."""

    def __init__(self, inner: _native.Sandbox) -> None:
        self.sync = inner
        """The underlying blocking `kiln.Sandbox`."""

    @classmethod
    async def create(cls, **config: Any) -> "Sandbox":
        """Boots a sandbox (same keywords as `kiln.Sandbox`)."""
        return cls(await _call(_native.Sandbox, **config))

    @classmethod
    async def restore(cls, dir: Any, **config: Any) -> "Sandbox":
        """`kiln.Sandbox.restore` as a coroutine."""
        return cls(await _call(_native.Sandbox.restore, dir, **config))

    @property
    def name(self) -> str:
        return self.sync.name

    @property
    def closed(self) -> bool:
        return self.sync.closed

    async def run(self, cmd: Any, **kwargs: Any) -> Result:
        """`kiln.Sandbox.run` as a coroutine."""
        return await _call(self.sync.run, cmd, **kwargs)

    async def stream(self, cmd: Any, **kwargs: Any) -> AsyncIterator[Event]:
        """The events of a command (`kiln.Sandbox.stream`) as an async iterator."""
        s = await _call(self.sync.stream, cmd, **kwargs)
        try:
            while True:
                ev = await _call(next, s, None)
                if ev is None:
                    return
                yield ev
        finally:
            if not s.done:
                await _call(s.kill)

    async def read(self, path: Any) -> bytes:
        return await _call(self.sync.read, path)

    async def read_text(self, path: Any, encoding: str = "utf-8", errors: str = "strict") -> str:
        return await _call(self.sync.read_text, path, encoding, errors)

    async def write(self, path: Any, data: Any) -> int:
        return await _call(self.sync.write, path, data)

    async def list(self, path: Any = None) -> List[DirEntry]:
        return await _call(self.sync.list, path)

    async def stat(self, path: Any) -> FileStat:
        return await _call(self.sync.stat, path)

    async def exists(self, path: Any) -> bool:
        return await _call(self.sync.exists, path)

    async def mkdir(self, path: Any) -> None:
        await _call(self.sync.mkdir, path)

    async def remove(self, path: Any, *, recursive: bool = False) -> None:
        await _call(self.sync.remove, path, recursive=recursive)

    async def rename(self, src: Any, dst: Any) -> None:
        await _call(self.sync.rename, src, dst)

    async def ping(self, timeout: Any = None) -> None:
        await _call(self.sync.ping, timeout)

    async def snapshot(self, dir: Any) -> SnapshotInfo:
        return await _call(self.sync.snapshot, dir)

    async def fork(self, n: int, **deadlines: Any) -> List["Sandbox"]:
        forks = await _call(self.sync.fork, n, **deadlines)
        return [Sandbox(f) for f in forks]

    async def shutdown(self) -> None:
        await _call(self.sync.shutdown)

    async def __aenter__(self) -> "Sandbox":
        return self

    async def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> bool:
        await self.shutdown()
        return False

    def __repr__(self) -> str:
        return f"<kiln.aio.Sandbox {self.sync!r}>"


class _Acquire:
    """`await pool.acquire()` or `async with pool.acquire() as sb`."""

    def __init__(self, pool: "SandboxPool", timeout: Any) -> None:
        self._pool = pool
        self._timeout = timeout
        self._sb: Optional[Sandbox] = None

    def __await__(self) -> Any:
        return self._get().__await__()

    async def _get(self) -> Sandbox:
        return Sandbox(await _call(self._pool.sync.acquire, self._timeout))

    async def __aenter__(self) -> Sandbox:
        self._sb = await self._get()
        return self._sb

    async def __aexit__(self, *exc: Any) -> bool:
        if self._sb is not None:
            await self._sb.shutdown()
        return False


class SandboxPool:
    """An async handle on a `kiln.SandboxPool`; make one with `await SandboxPool.create(...)`."""

    def __init__(self, inner: _native.SandboxPool) -> None:
        self.sync = inner

    @classmethod
    async def create(cls, **config: Any) -> "SandboxPool":
        """Starts a pool (same keywords as `kiln.SandboxPool`)."""
        return cls(await _call(_native.SandboxPool, **config))

    def acquire(self, timeout: Any = None) -> _Acquire:
        """A pooled sandbox: `await` it, or use `async with` (returned at the end)."""
        return _Acquire(self, timeout)

    async def warm(self, n: int) -> int:
        return await _call(self.sync.warm, n)

    def stats(self) -> PoolStats:
        return self.sync.stats()

    async def shutdown(self) -> None:
        await _call(self.sync.shutdown)

    async def __aenter__(self) -> "SandboxPool":
        return self

    async def __aexit__(self, *exc: Any) -> bool:
        await self.shutdown()
        return False
