"""service/batcher.py with a fake runtime: batching, health under bad inputs and runtime faults, cancellation, the
measured rate and the admission it drives (ServiceState.run_items)."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from gqtok.service import errors
from gqtok.service.batcher import FAILURES_UNTIL_UNHEALTHY, Batcher


class FakeRuntime:
    """Doubles its input; a row whose first value is 13 makes the call fail (a bad input); `broken` fails every
    call (a sticky fault); each call sleeps `seconds_per_pixel` per pixel; `release` gates calls when set."""

    def __init__(self, seconds_per_pixel: float = 0.0):
        self.seconds_per_pixel, self.broken, self.calls, self.gate = seconds_per_pixel, False, [], None

    def run(self, batch: np.ndarray) -> np.ndarray:
        self.calls.append(len(batch))
        if self.gate is not None:
            self.gate.wait(5)
        if self.broken or (batch[:, 0, 0] == 13).any():
            raise RuntimeError("bad")
        time.sleep(self.seconds_per_pixel * batch[:, :, :].size)
        return batch * 2

    def probe(self):
        return self.run(np.zeros((1, 2, 2)))


def make(rt: FakeRuntime, **kw) -> Batcher:
    args = dict(max_batch_size=4, max_delay_s=0.0, max_queue=64, pixels_of=lambda key: key[0] * key[1],
                probe=rt.probe)
    return Batcher("m/tokenize", rt.run, **(args | kw))


def run(coro):
    return asyncio.run(coro)


def test_items_come_back_doubled_and_bad_inputs_never_make_it_unhealthy():
    async def main():
        rt = FakeRuntime()
        b = make(rt)
        b.start()
        bad = np.full((2, 2), 13.0)
        for _ in range(2 * FAILURES_UNTIL_UNHEALTHY):  # bad inputs in a row: the probe succeeds each time
            with pytest.raises(errors.InferenceFailed):
                await b.submit((2, 2), bad)
        assert b.healthy
        out, timing = await b.submit((2, 2), np.ones((2, 2)))
        assert np.array_equal(out, 2 * np.ones((2, 2))) and timing.batch_size == 1
        await b.stop()
    run(main())


def test_a_sticky_fault_makes_it_unhealthy_and_waiting_items_fail_fast():
    async def main():
        rt = FakeRuntime()
        b = make(rt)
        b.start()
        rt.broken = True
        for _ in range(FAILURES_UNTIL_UNHEALTHY):
            with pytest.raises(errors.InferenceFailed):
                await b.submit((2, 2), np.ones((2, 2)))
        assert not b.healthy
        with pytest.raises(errors.NotReady):
            await b.submit((2, 2), np.ones((2, 2)))
        rt.broken = False  # the probe brings it back
        for _ in range(50):
            if b.healthy:
                break
            await asyncio.sleep(0.1)
        assert b.healthy
        await b.stop()
    run(main())


def test_a_batch_running_when_the_batcher_stops_resolves_its_futures():
    async def main():
        rt = FakeRuntime()
        rt.gate = threading.Event()
        b = make(rt)
        b.start()
        futures = [b.submit((2, 2), np.ones((2, 2))) for _ in range(3)]
        while not rt.calls:  # the batch is in the runtime
            await asyncio.sleep(0.01)
        stopping = asyncio.create_task(b.stop())
        await asyncio.sleep(0.05)
        rt.gate.set()
        await stopping
        results = await asyncio.gather(*futures, return_exceptions=True)
        assert all(isinstance(r, errors.InferenceFailed) for r in results), results
    run(main())


def test_the_rate_is_measured_and_predicts_the_backlog():
    async def main():
        rt = FakeRuntime(seconds_per_pixel=1e-4)
        b = make(rt, max_batch_size=1)
        b.start()
        assert b.work_s([(10, 10)]) is None  # nothing measured yet: nothing refused on a guess
        for _ in range(3):
            await b.submit((50, 50), np.ones((50, 50)))
        assert b.seconds_per_pixel == pytest.approx(1e-4, rel=0.5)
        assert b.work_s([(100, 100)]) == pytest.approx(1.0, rel=0.5)
        assert b.backlog_s([(100, 100)]) == b.work_s([(100, 100)])  # nothing waiting
        await b.stop()
    run(main())


def test_admission_refuses_work_that_would_outlast_the_request_timeout():
    """Alone past the timeout: 413 (not worth a retry). Behind a backlog past it: 429 with Retry-After."""
    from concurrent.futures import ThreadPoolExecutor

    from gqtok.service.metrics import ServiceMetrics
    from gqtok.service.settings import ServiceSettings
    from gqtok.service.state import ServiceState

    async def main():
        state = ServiceState(ServiceSettings(request_timeout_s=1.0), ServiceMetrics(), asyncio.Semaphore(1),
                             ThreadPoolExecutor(1))
        rt = FakeRuntime()
        b = make(rt, max_batch_size=1)
        b.start()
        b.seconds_per_pixel = 1e-4  # as measured: 1 s per 100x100
        with pytest.raises(errors.PayloadTooLarge, match="past the request timeout of 1 s"):
            await state.run_items(b, [((120, 120), np.ones((120, 120)))])
        rt.gate = threading.Event()  # a backlog: one item runs (held at the gate), 0.8 s of work waits
        first = asyncio.ensure_future(state.run_items(b, [((40, 40), np.ones((40, 40)))] * 6))
        await asyncio.sleep(0.05)
        with pytest.raises(errors.QueueFull, match="about 1.2 s of work queued"):
            await state.run_items(b, [((60, 60), np.ones((60, 60)))])
        rt.gate.set()
        outs, _ = await first
        assert len(outs) == 6
        await b.stop()
    run(main())


def test_threads_follow_a_containers_cpu_quota(tmp_path):
    from gqtok.core.kdtree import default_threads
    import os

    cores = len(os.sched_getaffinity(0))
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert default_threads(tmp_path) == cores
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs: 2 threads, if the cores allow
    assert default_threads(tmp_path) == min(cores, 2)
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    assert default_threads(tmp_path) == 1
    assert default_threads(tmp_path / "absent") == cores
