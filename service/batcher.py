"""Dynamic batching: requests for one model and direction share inference calls.

Each submitted item (one image or one token grid) carries a shape key; only
items with the same key are stacked. A batch holds at most `max_batch_size`
items and at most `max_batch_pixels` image pixels (at least one item): the
runtime's working memory grows with the pixels of a batch, so this bounds it
whatever the batch. A batch starts when it is full, or `max_delay_s` after its
oldest item arrived, whichever is first. Inference runs in a dedicated worker thread, so
the event loop never blocks; while it runs, the next batch gathers. The queue
is bounded: past `max_queue` waiting items, `submit` raises QueueFull (429).
A batch that raises is run again item by item, so that only the items that fail
on their own get an error (500 inference_failed); the server stays up.

Health: an item that fails on its own is followed by `probe` (a tiny inference on a known-good input): if the
probe succeeds the runtime is fine and the item was bad (bad inputs never make the model unhealthy); if it fails
too, that counts. After FAILURES_UNTIL_UNHEALTHY such failures in a row (a sticky runtime fault) the batcher is
unhealthy: its waiting items fail at once (503 not_ready), the model reports not ready, and every
PROBE_INTERVAL_S the worker runs `probe`; the first that succeeds makes it healthy again. A batch whose worker
is cancelled (the server stopping) fails its items rather than leave their requests waiting.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from gqtok.service.errors import InferenceFailed, NotReady, QueueFull
from gqtok.service.runtime import set_thread_nice

log = logging.getLogger("gqtok.batcher")
FAILURES_UNTIL_UNHEALTHY = 3
PROBE_INTERVAL_S = 1.0


@dataclass
class Timing:
    queue_s: float = 0.0  # from submit to the start of its batch
    inference_s: float = 0.0  # the batch's inference call
    batch_size: int = 0


@dataclass
class _Item:
    key: tuple
    payload: np.ndarray
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)
    cancelled: bool = False


def fail(item: _Item, e: Exception) -> None:
    if not item.future.done():
        item.future.set_exception(InferenceFailed(f"inference failed: {type(e).__name__}: {e}"))


class Batcher:
    def __init__(self, name: str, run_batch: Callable[[np.ndarray], np.ndarray], max_batch_size: int,
                 max_delay_s: float, max_queue: int, on_batch: Callable[[Timing], None] | None = None,
                 max_batch_pixels: int | None = None, pixels_of: Callable[[tuple], int] | None = None,
                 probe: Callable[[], object] | None = None, worker_nice: int = 0):
        self.name, self.run_batch, self.probe = name, run_batch, probe
        self.failures = 0  # inference calls in a row that failed on their own
        self.max_batch_size, self.max_delay_s, self.max_queue = max_batch_size, max_delay_s, max_queue
        self.max_batch_pixels, self.pixels_of = max_batch_pixels, pixels_of  # pixels_of(key): pixels of one item
        self.on_batch = on_batch
        # measured seconds of inference per pixel (an average over the recent batches): what backlog_s predicts
        # from; None until a batch ran
        self.seconds_per_pixel: float | None = None
        self.pending: list[_Item] = []
        self.reserved = 0  # slots held by admitted requests whose items are not queued yet (ServiceState.reserve)
        # worker_nice: the worker thread's nice value (runtime.set_thread_nice); onnxruntime's calling thread
        # computes too, so it runs at the pool's priority
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"infer-{name}",
                                           initializer=set_thread_nice, initargs=(worker_nice,))
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    @property
    def depth(self) -> int:
        return len(self.pending)

    @property
    def healthy(self) -> bool:
        return self.failures < FAILURES_UNTIL_UNHEALTHY

    def _record(self, ok: bool) -> None:
        if ok:
            if not self.healthy:
                log.warning("%s recovered", self.name)
            self.failures = 0
        else:
            self.failures += 1
            if self.failures == FAILURES_UNTIL_UNHEALTHY:
                log.error("%s: %d inference calls in a row failed; not ready until a probe succeeds",
                          self.name, self.failures)

    async def _probe_until_healthy(self, loop) -> None:
        while not self.healthy:
            for item in self.pending:
                if not item.future.done():
                    item.future.set_exception(NotReady(f"{self.name} is failing; retry later",
                                                       headers={"Retry-After": "1"}))
            self.pending.clear()
            await asyncio.sleep(PROBE_INTERVAL_S)
            try:
                await loop.run_in_executor(self.executor, self.probe)
                self._record(True)
            except Exception as e:
                log.warning("%s probe failed: %s: %s", self.name, type(e).__name__, e)

    def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher-{self.name}")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for item in self.pending:
            if not item.future.done():
                item.future.set_exception(InferenceFailed("server stopped before this item ran"))
        self.pending.clear()
        self.executor.shutdown(wait=True)

    def check_room(self, count: int) -> None:
        """Raise QueueFull unless `count` more items fit beside those waiting and those reserved; requests check
        all their images before queuing any."""
        if len(self.pending) + self.reserved + count > self.max_queue:
            raise QueueFull(f"{self.name} queue is full ({len(self.pending)} waiting, {self.reserved} reserved, of "
                            f"{self.max_queue}); retry later", headers={"Retry-After": "1"})

    def submit(self, key: tuple, payload: np.ndarray) -> asyncio.Future:
        """Queue one item; the future resolves to (output row, Timing)."""
        self.check_room(1)
        item = _Item(key, payload, asyncio.get_running_loop().create_future())
        self.pending.append(item)
        self._wakeup.set()
        item.future.add_done_callback(lambda f, it=item: setattr(it, "cancelled", f.cancelled()))
        return item.future

    def work_s(self, keys: list[tuple]) -> float | None:
        """Seconds of inference that items of these keys need at the measured rate; None before any measurement,
        or when items have no pixel count."""
        if self.seconds_per_pixel is None or self.pixels_of is None:
            return None
        return sum(map(self.pixels_of, keys)) * self.seconds_per_pixel

    def backlog_s(self, keys: list[tuple] = ()) -> float | None:
        """work_s of the waiting items and of `keys` (items about to be queued behind them)."""
        return self.work_s([it.key for it in self.pending if not it.cancelled] + list(keys))

    def _learn_rate(self, batch: list[_Item], seconds: float) -> None:
        if self.pixels_of is None:
            return
        rate = seconds / max(1, sum(self.pixels_of(it.key) for it in batch))
        self.seconds_per_pixel = rate if self.seconds_per_pixel is None else 0.8 * self.seconds_per_pixel + 0.2 * rate

    def batch_limit(self, key: tuple) -> int:
        """Items of this shape per batch: max_batch_size, fewer where their pixels pass max_batch_pixels."""
        if self.max_batch_pixels is None or self.pixels_of is None:
            return self.max_batch_size
        return max(1, min(self.max_batch_size, self.max_batch_pixels // max(1, self.pixels_of(key))))

    def _same_key(self, key: tuple) -> int:
        return sum(1 for it in self.pending if it.key == key and not it.cancelled)

    async def _run(self, loop, batch: list[_Item]) -> list | None:
        """Outputs of a batch (None where an item failed, which is failed), or None if the whole batch failed."""
        start = time.perf_counter()
        try:
            out = await loop.run_in_executor(self.executor, self.run_batch, np.stack([it.payload for it in batch]))
            self._record(True)
            self._learn_rate(batch, time.perf_counter() - start)
            return out
        except Exception as e:
            log.exception("%s batch of %d failed", self.name, len(batch))
            if len(batch) == 1:
                await self._failed_alone(loop, batch[0], e)
                return None
        # One bad item must not fail its neighbours: run the batch again one item at a time, so only the items
        # that fail alone fail (a token's result does not depend on its batch).
        out = []
        for it in batch:
            try:
                out.append((await loop.run_in_executor(self.executor, self.run_batch, it.payload[None]))[0])
                self._record(True)
            except Exception as e_item:
                await self._failed_alone(loop, it, e_item)
                out.append(None)
        return out

    async def _failed_alone(self, loop, item: _Item, e: Exception) -> None:
        """Count the failure against the runtime's health only if the probe fails too; then fail the item (its
        request is answered once the server's health says what it is)."""
        try:
            if self.probe is None:
                raise e
            await loop.run_in_executor(self.executor, self.probe)
        except Exception:
            self._record(False)
        fail(item, e)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.healthy and self.probe is not None:
                await self._probe_until_healthy(loop)
            self.pending = [it for it in self.pending if not it.cancelled]
            if not self.pending:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            first = self.pending[0]
            deadline = first.enqueued + self.max_delay_s
            limit = self.batch_limit(first.key)
            while self._same_key(first.key) < limit and (left := deadline - time.perf_counter()) > 0:
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), left)
                except TimeoutError:
                    break
            batch = [it for it in self.pending if it.key == first.key and not it.cancelled][:limit]
            if not batch:
                continue
            taken = set(map(id, batch))
            self.pending = [it for it in self.pending if id(it) not in taken]
            start = time.perf_counter()
            try:
                out = await self._run(loop, batch)
            except asyncio.CancelledError:
                for it in batch:
                    if not it.future.done():
                        it.future.set_exception(InferenceFailed("server stopped while this item ran"))
                raise
            if out is None:
                continue
            timing_end = time.perf_counter()
            for i, it in enumerate(batch):
                if not it.future.done() and out[i] is not None:
                    it.future.set_result((out[i], Timing(start - it.enqueued, timing_end - start, len(batch))))
            if self.on_batch:
                self.on_batch(Timing(0.0, timing_end - start, len(batch)))
