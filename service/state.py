"""The app's typed state and the dependencies that routes share: the model a request names, queueing items on
a model's batcher under the request timeout, entropy coding under its concurrency limit, timing headers."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from fastapi import Request
from starlette.concurrency import run_in_threadpool

from gqtok.core.bitstream import BitstreamError
from gqtok.service import errors
from gqtok.service.batcher import Batcher, Timing
from gqtok.service.images import padded_pixels
from gqtok.service.memory import IMAGE_BYTES_PER_PIXEL, JSON_IMAGE_COPIES, MemoryPlan, RequestMemory
from gqtok.service.metrics import ServiceMetrics
from gqtok.service.served import ServedCodec, ServedModel
from gqtok.service.settings import ServiceSettings


RESERVED = "gqtok.reserved"  # the scope key of a request's reserved queue slot: the Batcher


@dataclass
class ServiceState:
    settings: ServiceSettings
    metrics: ServiceMetrics
    coding: asyncio.Semaphore  # entropy coding holds a core per request: max_concurrent_coding slots
    coding_pool: ThreadPoolExecutor  # as many threads as slots
    models: dict[str, ServedModel] = field(default_factory=dict)
    codecs: dict[str, ServedCodec] = field(default_factory=dict)
    default: str | None = None
    memory: MemoryPlan | None = None  # with max_memory_mb: the measured memory model and the limits it set
    request_memory: RequestMemory | None = None  # with max_memory_mb: what requests hold outside inference
    draining: bool = False
    inflight: int = 0

    def hold(self, scope: dict, n: int, what: str) -> None:
        """Take n bytes of the request memory for this request (nothing without a memory budget); 429 or 413."""
        if self.request_memory is not None and n > 0:
            self.request_memory.take(scope, n, what)

    def image_body_limit(self, kind: str) -> int:
        """The most bytes an image body of this media type can need within the pixel limit (at most
        max_body_bytes): per image, a 16-bit RGBA PNG stored uncompressed (8 bytes per pixel) and 1 MiB of
        metadata; base64 adds a third in JSON; multipart and JSON carry max_images_per_request of them. A larger
        body is refused (413) before it is read, so the limit follows the pixel limit (and a memory budget's)."""
        s = self.settings
        one = 8 * s.max_image_pixels + 2**20
        need = {"application/json": s.max_images_per_request * one * 4 // 3,
                "multipart/form-data": s.max_images_per_request * one}.get(kind, one)
        return min(s.max_body_bytes, need)

    def body_holder(self, scope: dict):
        """read_body's `hold`: a body without a declared length takes its memory as it arrives."""
        return None if self.request_memory is None else lambda n: self.hold(scope, n, "the request body")

    def hold_parsed(self, scope: dict, kind: str, body: bytes) -> None:
        """The memory of a body's parsed form (JSON objects, multipart parts) before it is parsed."""
        copies = {"application/json": JSON_IMAGE_COPIES, "multipart/form-data": 1}.get(kind, 0)
        self.hold(scope, copies * len(body), f"the parsed {kind} body")

    async def hold_images(self, scope: dict, payloads: list[bytes], multiple: int) -> None:
        """The memory of decoding these images (from their headers, before a pixel is decoded)."""
        if self.request_memory is None:
            return
        pixels = await run_in_threadpool(lambda: sum(padded_pixels(d, multiple) for d in payloads))
        self.hold(scope, IMAGE_BYTES_PER_PIXEL * pixels, f"decoding {len(payloads)} image(s) of {pixels} pixels")

    @property
    def saturated(self) -> bool:
        """New work would be refused now: every in-flight slot taken, or a queue full."""
        full = any(b.depth + b.reserved >= b.max_queue for m in self.models.values() for b in (m.tokenize, m.detokenize))
        return full or self.inflight >= self.settings.max_concurrent_requests

    def model(self, model_id: str | None) -> ServedModel:
        """The loaded, warmed-up model a request names (None: the default); 404 or 503 otherwise."""
        mid = model_id or self.default
        served = self.models.get(mid)
        if served is None and mid in self.codecs:
            raise errors.InvalidRequest(f"{mid} is a codec model: it has no tokens; it compresses (/v1/compress?model="
                                        f"{mid}&quality=N) and decompresses its own streams")
        if served is None:
            raise errors.UnknownModel(f"unknown model {mid!r}; loaded: {sorted(self.models)}")
        if not served.ready:
            raise errors.NotReady(f"model {mid} is still warming up", headers={"Retry-After": "1"})
        return served

    def codec(self, model_id: str) -> ServedCodec:
        """A loaded, warmed-up codec model; 404 or 503 otherwise."""
        served = self.codecs.get(model_id)
        if served is None:
            raise errors.UnknownModel(f"unknown codec {model_id!r}; loaded codecs: {sorted(self.codecs)} (start the "
                                      "server with --codec NAME)")
        if not served.ready:
            raise errors.NotReady(f"codec {model_id} is still warming up", headers={"Retry-After": "1"})
        return served

    def known_model(self, model_id: str) -> ServedModel:
        """A loaded model by id, ready or not (metadata routes); 404 otherwise."""
        if model_id not in self.models:
            self.model(model_id)  # a codec's id: 400 saying so; else 404
        return self.models[model_id]

    @staticmethod
    def admit(batcher: Batcher, count: int, scope: dict | None = None) -> None:
        """413 when `count` items could never fit the queue (not a reason to retry), 429 when they do not fit now
        (beside the slot this request reserved, if it did)."""
        if count > batcher.max_queue:
            raise errors.PayloadTooLarge(f"{count} items in one request; this server queues at most "
                                         f"{batcher.max_queue} per model")
        batcher.check_room(count - (scope is not None and scope.get(RESERVED) is batcher))

    def reserve(self, scope: dict, batcher: Batcher) -> None:
        """Admit a one-item request at the door (app.Gatekeeper) and hold its queue slot while its body is read
        and decoded, so that the requests behind it are refused at once rather than after their own reading."""
        self.admit(batcher, 1)
        batcher.reserved += 1
        scope[RESERVED] = batcher

    @staticmethod
    def unreserve(scope: dict | None) -> None:
        """Give back the request's reserved slot, if it holds one: when its items are queued, or when it ends."""
        batcher = scope.pop(RESERVED, None) if scope is not None else None
        if batcher is not None:
            batcher.reserved -= 1

    async def run_items(self, batcher: Batcher, items: list[tuple[tuple, np.ndarray]],
                        scope: dict | None = None) -> tuple[list[np.ndarray], Timing]:
        """Queue every item of one request (its reserved slot, if any, becomes one of them), wait for all under
        the request timeout; worst timing of the lot."""
        self.admit(batcher, len(items), scope)
        timeout = self.settings.request_timeout_s
        keys = [key for key, _ in items]
        own, backlog = batcher.work_s(keys), batcher.backlog_s(keys)
        if own is not None and own > timeout:  # alone it would time out: not worth a retry
            raise errors.PayloadTooLarge(f"these {len(items)} items need about {own:.1f} s of inference at "
                                         f"{batcher.name}'s measured rate, past the request timeout of {timeout:g} s; "
                                         "send fewer or smaller ones per request")
        if backlog is not None and backlog > timeout:  # it would time out in the queue: refuse it now, cheaply
            raise errors.QueueFull(f"{batcher.name} has about {backlog:.1f} s of work queued with these items, past "
                                   f"the request timeout of {timeout:g} s; retry later or send less at once",
                                   headers={"Retry-After": str(max(1, round(backlog - timeout)))})
        self.unreserve(scope)
        futures = [batcher.submit(key, payload) for key, payload in items]
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
        """Entropy coding on the coding pool, at most max_concurrent_coding at once, under the request timeout.
        A slot is freed when its work ends, not when a request stops waiting for it: a timed-out request's
        coding still holds a core until it finishes, so it still counts."""
        timeout = self.settings.request_timeout_s
        deadline = asyncio.get_running_loop().time() + timeout
        too_long = errors.RequestTimeout(f"entropy coding took longer than {timeout:g} s", headers={"Retry-After": "1"})
        try:
            await asyncio.wait_for(self.coding.acquire(), timeout)
        except TimeoutError:
            raise too_long from None
        work = asyncio.get_running_loop().run_in_executor(self.coding_pool, fn, *args)
        work.add_done_callback(lambda _: self.coding.release())
        try:
            return await asyncio.wait_for(asyncio.shield(work), max(0.0, deadline - asyncio.get_running_loop().time()))
        except TimeoutError:
            raise too_long from None
        except BitstreamError as e:
            raise errors.InvalidBitstream(str(e)) from None


def get_state(request: Request) -> ServiceState:
    """FastAPI dependency: the app's ServiceState."""
    return request.app.state.service


def response_headers(served: ServedModel, t: Timing) -> dict[str, str]:
    """What answered (model id, version, codebook digest) and how long it queued and ran (ms)."""
    return served.headers | {"x-queue-time": f"{1e3 * t.queue_s:.3f}", "x-inference-time": f"{1e3 * t.inference_s:.3f}"}
