"""Dynamic batching: concurrent requests gathered into one call of a blocking function.

Requests wait in an asyncio queue. The batch loop takes the first waiting request, then
gathers more for at most ``max_wait_ms`` (or until ``max_batch_size``), and runs the
blocking ``process`` (the moderation engine and the decision store) on them in a worker
thread, so the event loop keeps accepting requests meanwhile. Requests that arrive while a
batch runs are already waiting when it ends and form the next batch without delay: under
load, batches fill up by themselves; alone, a request waits ``max_wait_ms`` at most.

``max_batch_size=1, max_wait_ms=0`` is one-at-a-time processing (the same single worker).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")
R2 = TypeVar("R2")


class QueueFull(RuntimeError):
    """More requests are waiting than the server accepts (``max_queue``)."""


class BatcherClosed(RuntimeError):
    """The batcher is not running (the server is starting up or shutting down)."""


@dataclass
class _Pending(Generic[T, R]):
    item: T
    future: asyncio.Future[R]
    enqueued: float
    cost: int = 0


class DynamicBatcher(Generic[T, R]):
    """Run ``process(items) -> results`` (one result per item, same order) on batches."""

    def __init__(
        self,
        process: Callable[[list[T]], Sequence[R]],
        *,
        max_batch_size: int = 8,
        max_wait_ms: float = 5.0,
        max_queue: int = 256,
        max_queue_cost: int | None = None,
        on_batch: Callable[[int, float], None] | None = None,
        name: str = "icm-batch",
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if max_wait_ms < 0:
            raise ValueError("max_wait_ms must be >= 0")
        self.process = process
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.max_queue_cost = max_queue_cost
        self.queued_cost = 0  # cost of the items waiting or being processed (their memory)
        self.on_batch = on_batch
        self._name = name
        self._queue: asyncio.Queue[_Pending[T, R]] | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self.batches = 0
        self.items = 0
        self._unfinished = 0
        self._closing = False

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        if self.running:
            return
        self._queue = asyncio.Queue()
        self._closing = False
        self._unfinished = 0
        self.queued_cost = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self._name)
        self._task = asyncio.create_task(self._loop(), name=self._name)

    async def stop(self, timeout: float = 30.0) -> None:
        """Refuse new items, finish the queued ones (up to ``timeout`` s), stop the worker."""
        self._closing = True
        deadline = time.monotonic() + timeout
        while self.running and self._unfinished > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        if self._queue is not None:
            while not self._queue.empty():
                p = self._queue.get_nowait()
                if not p.future.done():
                    p.future.set_exception(BatcherClosed("the server is shutting down"))
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    async def run_exclusive(self, fn: Callable[..., R2], *args: object) -> R2:
        """Run ``fn(*args)`` in the worker thread between batches (never beside ``process``)."""
        if self._executor is None:
            raise BatcherClosed("the batch worker is not running")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def submit(self, item: T, cost: int = 0) -> R:
        """Queue one item and wait for its result (exceptions of ``process`` propagate).

        ``cost`` (the memory the item holds, in bytes) counts against ``max_queue_cost``
        until its batch is done; an item is always accepted into an empty queue.
        """
        if not self.running or self._queue is None or self._closing:
            raise BatcherClosed("the batch worker is not running")
        if self._queue.qsize() >= self.max_queue:
            raise QueueFull(f"{self._queue.qsize()} requests are already waiting (limit {self.max_queue})")
        if self.max_queue_cost is not None and self.queued_cost and self.queued_cost + cost > self.max_queue_cost:
            raise QueueFull(
                f"the waiting requests hold {self.queued_cost / 2**20:,.0f} MiB (limit {self.max_queue_cost / 2**20:,.0f} MiB)"
            )
        fut: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._unfinished += 1
        self.queued_cost += cost
        self._queue.put_nowait(_Pending(item, fut, time.perf_counter(), cost))
        # A request cancelled while waiting (client gone) cancels its future; the batch
        # loop then skips it. Once its batch runs, the result is stored regardless.
        return await fut

    async def _gather(self) -> list[_Pending[T, R]]:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        batch = [await self._queue.get()]
        deadline = loop.time() + self.max_wait
        while len(batch) < self.max_batch_size:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            try:
                await self._run(loop, batch)
            finally:
                self._unfinished -= len(batch)
                self.queued_cost -= sum(p.cost for p in batch)

    async def _run(self, loop: asyncio.AbstractEventLoop, batch: list[_Pending[T, R]]) -> None:
        live = [p for p in batch if not p.future.done()]  # a cancelled request needs no work
        if not live:
            return
        t0 = time.perf_counter()
        try:
            results = await loop.run_in_executor(self._executor, self.process, [p.item for p in live])
            if len(results) != len(live):
                raise RuntimeError(f"process returned {len(results)} results for {len(live)} items")
        except asyncio.CancelledError:
            for p in live:
                if not p.future.done():
                    p.future.set_exception(BatcherClosed("the server is shutting down"))
            raise
        except Exception as exc:  # the failure goes to every waiting request, the batcher keeps running
            log.exception("batch of %d failed", len(live))
            for p in live:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        finally:
            self.batches += 1
            self.items += len(live)
            if self.on_batch is not None:
                try:
                    self.on_batch(len(live), time.perf_counter() - t0)
                except Exception:  # a metrics hook must not fail the batch's requests
                    log.debug("on_batch hook failed", exc_info=True)
        for p, r in zip(live, results, strict=True):
            if not p.future.done():
                p.future.set_result(r)
