"""Running async code from sync callers: one event loop in a daemon thread.

The HTTP clients of :mod:`icm.openai_http` are asynchronous at their core; code that is
not (the CLI, the moderation engine, chat, worker threads) calls them through a
:class:`LoopThread`: one event loop, started on first use in a daemon thread, that runs
every coroutine handed to it.  This works from plain code, from worker threads and from
inside a running event loop alike (the caller's thread waits; the coroutine runs on the
runner's loop), and starts no thread per call.  A backend keeps its own runner (its
connection pool lives on that loop); :func:`run_sync` uses one runner shared by the
process.  After a fork the child starts a fresh loop.
"""

from __future__ import annotations

import asyncio
import os
import threading
import weakref
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["LoopThread", "in_daemon_thread", "run_sync"]

T = TypeVar("T")


def _stop(loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
    if not loop.is_closed():
        try:
            loop.call_soon_threadsafe(loop.stop)
        except RuntimeError:
            pass
    if thread is not threading.current_thread():
        thread.join(timeout=5)


class LoopThread:
    """An asyncio event loop in a daemon thread; :meth:`run` a coroutine on it from any other thread."""

    def __init__(self, name: str = "icm-loop") -> None:
        self.name = name
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pid: int | None = None
        self._finalizer: weakref.finalize | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop, started on first use (or again after a fork or :meth:`close`)."""
        with self._lock:
            if self._loop is not None and self._thread is not None and self._pid == os.getpid() and self._thread.is_alive():
                return self._loop
            loop = asyncio.new_event_loop()
            ready = threading.Event()

            def main() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(ready.set)
                try:
                    loop.run_forever()
                finally:
                    try:
                        loop.run_until_complete(loop.shutdown_asyncgens())
                    finally:
                        loop.close()

            thread = threading.Thread(target=main, name=self.name, daemon=True)
            thread.start()
            ready.wait()
            self._loop, self._thread, self._pid = loop, thread, os.getpid()
            self._finalizer = weakref.finalize(self, _stop, loop, thread)
            return loop

    @property
    def started(self) -> bool:
        """Whether the loop runs now (in this process)."""
        return self._loop is not None and self._pid == os.getpid() and self._thread is not None and self._thread.is_alive()

    def in_loop_thread(self) -> bool:
        return self._thread is not None and threading.current_thread() is self._thread

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and wait for its result (its exception is raised here)."""
        if self.in_loop_thread():
            coro.close()
            raise RuntimeError(f"{self.name}: a sync call cannot wait on its own event loop (await the async API instead)")
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result()
        except BaseException:
            fut.cancel()  # e.g. KeyboardInterrupt in the waiting thread
            raise

    def close(self, cleanup: Callable[[], Coroutine[Any, Any, Any]] | None = None) -> None:
        """Run ``cleanup()`` on the loop (best effort), then stop the loop and its thread."""
        with self._lock:
            loop, thread, same = self._loop, self._thread, self._pid == os.getpid()
            self._loop = self._thread = self._pid = None
            if self._finalizer is not None:
                self._finalizer.detach()
                self._finalizer = None
        if loop is None or thread is None or not same:
            return
        if cleanup is not None and thread.is_alive():
            try:
                asyncio.run_coroutine_threadsafe(cleanup(), loop).result(timeout=5)
            except Exception:  # noqa: BLE001 - best effort on shutdown
                pass
        _stop(loop, thread)


_SHARED: LoopThread | None = None
_SHARED_LOCK = threading.Lock()


def run_sync(coro: Coroutine[Any, Any, T], runner: LoopThread | None = None) -> T:
    """Run ``coro`` to completion from sync code, on ``runner`` (default: one loop shared by the process)."""
    global _SHARED
    if runner is None:
        with _SHARED_LOCK:
            if _SHARED is None:
                _SHARED = LoopThread("icm-run-sync")
            runner = _SHARED
    return runner.run(coro)


async def in_daemon_thread(fn: Callable[..., T], *args: Any) -> T:
    """Await a blocking local call (hashing, decoding a file) run in a daemon thread.

    Not for HTTP (that is async). A daemon thread, unlike ``asyncio.to_thread``'s pool,
    never keeps an interrupted run waiting for it at exit.
    """
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if not fut.done():
            (fut.set_result if ok else fut.set_exception)(value)

    def main() -> None:
        value: Any  # the result, or the exception for the awaiting coroutine
        try:
            res = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            ok, value = False, exc
        else:
            ok, value = True, res
        try:
            loop.call_soon_threadsafe(settle, ok, value)
        except RuntimeError:
            pass  # the loop is gone (the run was interrupted)

    threading.Thread(target=main, name="icm-blocking-call", daemon=True).start()
    return await fut
