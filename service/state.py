"""The app's typed state and the dependencies that routes share: the model a request names, queueing items on
a model's batcher under the request timeout, entropy coding under its concurrency limit, timing headers."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import numpy as np
from fastapi import Request
from starlette.concurrency import run_in_threadpool

from gqtok.core.bitstream import BitstreamError
from gqtok.service import errors
from gqtok.service.batcher import Batcher, Timing
from gqtok.service.metrics import ServiceMetrics
from gqtok.service.served import ServedModel
from gqtok.service.settings import ServiceSettings


@dataclass
class ServiceState:
    settings: ServiceSettings
    metrics: ServiceMetrics
    coding: asyncio.Semaphore  # entropy coding holds a core per request
    models: dict[str, ServedModel] = field(default_factory=dict)
    default: str | None = None
    draining: bool = False
    inflight: int = 0

    def model(self, model_id: str | None) -> ServedModel:
        """The loaded, warmed-up model a request names (None: the default); 404 or 503 otherwise."""
        mid = model_id or self.default
        served = self.models.get(mid)
        if served is None:
            raise errors.UnknownModel(f"unknown model {mid!r}; loaded: {sorted(self.models)}")
        if not served.ready:
            raise errors.NotReady(f"model {mid} is still warming up", headers={"Retry-After": "1"})
        return served

    def known_model(self, model_id: str) -> ServedModel:
        """A loaded model by id, ready or not (metadata routes); 404 otherwise."""
        if model_id not in self.models:
            raise errors.UnknownModel(f"unknown model {model_id!r}; loaded: {sorted(self.models)}")
        return self.models[model_id]

    async def run_items(self, batcher: Batcher, items: list[tuple[tuple, np.ndarray]]) -> tuple[list[np.ndarray], Timing]:
        """Queue every item of one request, wait for all under the request timeout; worst timing of the lot."""
        if len(items) > batcher.max_queue:  # would be refused forever: not a reason to retry
            raise errors.PayloadTooLarge(f"{len(items)} items in one request; this server queues at most "
                                         f"{batcher.max_queue} per model")
        batcher.check_room(len(items))
        futures = [batcher.submit(key, payload) for key, payload in items]
        timeout = self.settings.request_timeout_s
        try:
            done = await asyncio.wait_for(asyncio.gather(*futures), timeout)
        except TimeoutError:
            for fut in futures:
                fut.cancel()
            raise errors.RequestTimeout(f"request took longer than {timeout:g} s", headers={"Retry-After": "1"}) from None
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise
        model_id, direction = batcher.name.split("/")
        for _, t in done:
            self.metrics.observe_queue(model_id, direction, t.queue_s)
        timing = Timing(max(t.queue_s for _, t in done), max(t.inference_s for _, t in done),
                        max(t.batch_size for _, t in done))
        return [out for out, _ in done], timing

    async def run_coding(self, fn, *args):
        """Entropy coding in a worker thread, at most max_concurrent_coding at once, under the request timeout."""
        async def guarded():
            async with self.coding:
                return await run_in_threadpool(fn, *args)

        timeout = self.settings.request_timeout_s
        try:
            return await asyncio.wait_for(guarded(), timeout)
        except TimeoutError:
            raise errors.RequestTimeout(f"entropy coding took longer than {timeout:g} s",
                                        headers={"Retry-After": "1"}) from None
        except BitstreamError as e:
            raise errors.InvalidBitstream(str(e)) from None


def get_state(request: Request) -> ServiceState:
    """FastAPI dependency: the app's ServiceState."""
    return request.app.state.service


def timing_headers(t: Timing) -> dict[str, str]:
    return {"x-queue-time": f"{1e3 * t.queue_s:.3f}", "x-inference-time": f"{1e3 * t.inference_s:.3f}"}
