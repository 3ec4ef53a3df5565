"""The tokenizer service: a FastAPI app over batched onnxruntime inference.

    app = create_app(ServiceSettings(models=["default"]))

Routers (service/routers/): tokens (POST /v1/tokenize, /v1/detokenize), compression (POST /v1/compress,
/v1/decompress), models (GET /v1/models, /v1/models/{id}, /v1/models/{id}/codebook), health (GET /health/live,
/health/ready, /metrics, /info). OpenAPI at /openapi.json, Swagger UI at /docs from bundled assets (no CDN).

Every error is a JSON {"error", "error_type"} with the status of its ServiceError class (service/errors.py);
bad input never yields a 500.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from urllib.parse import parse_qs

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import Request

import gqtok
from gqtok.core.artifact import ArtifactError
from gqtok.service import errors, memory
from gqtok.service.images import MEDIA_TYPES
from gqtok.service.metrics import ServiceMetrics
from gqtok.service.requests import media_type
from gqtok.service.routers import compression, health, models, tokens
from gqtok.service.schemas import JSON_BODY_MODELS
from gqtok.service.runtime import set_thread_nice
from gqtok.service.served import load_codecs, load_models, warm_up, warm_up_codec
from gqtok.service.settings import ServiceSettings
from gqtok.service.state import ServiceState

log = logging.getLogger("gqtok.service")
DOCS_ASSETS = "/docs/static"  # Swagger UI's JavaScript and CSS, served from the fastapi-offline package
# probes and scrapes are never refused for load: a balancer and a monitor must see an overloaded server as it is
# (/health/* needs no API key either; /metrics does)
NOT_LOAD_LIMITED = ("/health/", "/metrics")


def create_app(settings: ServiceSettings | None = None) -> FastAPI:
    settings = settings or ServiceSettings()
    state = ServiceState(settings, ServiceMetrics(), asyncio.Semaphore(settings.max_concurrent_coding),
                         ThreadPoolExecutor(settings.max_concurrent_coding, thread_name_prefix="coding",
                                            initializer=set_thread_nice, initargs=(settings.inference_nice,)))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loaded = await run_in_threadpool(load_models, settings, state.metrics)
        state.models, state.default = loaded, settings.default_model or next(iter(loaded))
        if state.default not in loaded:
            raise ArtifactError(f"default model {state.default!r} is not among the loaded models {sorted(loaded)}")
        for model in loaded.values():
            model.tokenize.start()
            model.detokenize.start()
        state.codecs = await run_in_threadpool(load_codecs, settings, set(loaded))
        for model in loaded.values():
            await run_in_threadpool(warm_up, model)
        for codec in state.codecs.values():
            await run_in_threadpool(warm_up_codec, codec)
        if settings.max_memory_mb:
            await run_in_threadpool(apply_memory_budget, state)
        state.metrics.ready.set_function(
            lambda: float(all(m.ready for m in [*state.models.values(), *state.codecs.values()])))
        yield
        for model in loaded.values():
            await model.tokenize.stop()
            await model.detokenize.stop()
        state.coding_pool.shutdown(wait=True)

    app = FastAPIOffline(title="gqtok", version=gqtok.__version__, lifespan=lifespan, redoc_url=None,
                         static_url=DOCS_ASSETS,
                         description="Gaussian Quant image tokenizer: images <-> integer token grids.")
    app.state.service = state
    errors.install_handlers(app, log)
    for router in (tokens.router, compression.router, models.router, health.router):
        app.include_router(router)
    app.add_middleware(Gatekeeper, state=state)
    app.openapi = lambda: openapi_schema(app)
    return app


def apply_memory_budget(state: ServiceState) -> None:
    """Measure the warmed-up models and lower the pixel limits to what the memory budget allows."""
    settings = state.settings
    state.memory = memory.plan(settings.max_memory_mb, {mid: m.runtime for mid, m in state.models.items()})
    limits = state.memory.limits(settings.max_image_pixels, settings.max_batch_pixels)
    # what inference can take at its peak is bounded by the batch pixels; the rest of the budget is the requests'
    state.request_memory = memory.RequestMemory(
        state.memory.budget_bytes - state.memory.predicted_peak_bytes(limits["max_batch_pixels"]))
    state.settings = settings.model_copy(update=limits)
    for model in state.models.values():
        model.tokenize.max_batch_pixels = model.detokenize.max_batch_pixels = limits["max_batch_pixels"]


class Gatekeeper:
    """Pure ASGI middleware, outermost but for Starlette's error handler: auth, draining, the in-flight limit and,
    for one raw image to /v1/tokenize, a full queue (admission before the body is read or a route runs), then
    per-route metrics and x-total-time on every answer, 500s included. Pure ASGI rather than
    @app.middleware("http"), which wraps every request in a task group and a body stream of its own: per-request
    work the event loop cannot spare under a flood (benchmarks/flood.py)."""

    def __init__(self, app, state: ServiceState):
        self.app, self.state = app, state
        key = state.settings.api_key
        self.api_key = key.get_secret_value().encode() if key else None

    def refusal(self, scope) -> tuple[errors.ServiceError, str] | None:
        """Why this request is refused before any work, with the metrics label; None to admit it."""
        state, settings = self.state, self.state.settings
        if self.api_key is not None:
            given = Headers(scope=scope).get("authorization", "")
            token = given[7:].encode() if given[:7].lower() == "bearer " else b""
            if not hmac.compare_digest(token, self.api_key):  # constant time whatever the length of the guess
                return errors.Unauthorized("missing or wrong API key (Authorization: Bearer KEY)"), "unauthorized"
        if scope["path"].startswith(NOT_LOAD_LIMITED):
            return None
        if state.draining:
            return errors.ShuttingDown("server is shutting down", headers={"Retry-After": "1"}), "draining"
        if state.inflight >= settings.max_concurrent_requests:
            return errors.TooManyRequests(f"{state.inflight} requests in flight, the limit is "
                                          f"{settings.max_concurrent_requests}; retry later",
                                          headers={"Retry-After": "1"}), "overloaded"
        return self.memory_refusal(scope) or self.queue_refusal(scope)

    def memory_refusal(self, scope) -> tuple[errors.ServiceError, str] | None:
        """A declared body that does not fit the request memory now: refused before a byte of it is read (a body
        without a length takes its memory as it arrives, in requests.read_body)."""
        declared = Headers(scope=scope).get("content-length", "")
        if self.state.request_memory is None or scope["method"] != "POST" or not declared.isdigit():
            return None
        try:
            self.state.hold(scope, memory.BODY_COPIES * int(declared), "the request body")
        except errors.ServiceError as e:
            return e, "memory"
        return None

    def queue_refusal(self, scope) -> tuple[errors.ServiceError, str] | None:
        """One raw image to /v1/tokenize (its count known from the headers) when its model's queue is full: the
        refusal costs no routing, no body and no decode. Admitted, it holds a queue slot until its image is queued
        (ServiceState.reserve). Other bodies are counted, and refused, by the route."""
        if scope["path"] != "/v1/tokenize" or scope["method"] != "POST":
            return None
        if media_type(Request(scope)) not in MEDIA_TYPES:
            return None
        model = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("model", [None])[-1]
        served = self.state.models.get(model or self.state.default)
        if served is None:
            return None  # the route answers 404 for an unknown model
        try:
            self.state.reserve(scope, served.tokenize)
        except errors.ServiceError as e:
            return e, "/v1/tokenize"
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        metrics = self.state.metrics
        body = RequestBody(scope, receive, self.state.settings.max_body_bytes)
        refused = None if scope["path"].startswith("/health/") else self.refusal(scope)
        if refused is not None:
            e, label = refused
            metrics.count_request(label, e.status)
            response = JSONResponse(e.body(), status_code=e.status, headers=e.headers)
            return await response(scope, body.receive, body.answer_then_drop(send))
        started = False  # counted when the answer starts, before the client can see it

        async def send_timed(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                MutableHeaders(scope=message).append("x-total-time", f"{1e3 * (time.perf_counter() - start):.3f}")
                metrics.count_request(route_of(scope), message["status"])
            await send(message)

        self.state.inflight += 1
        try:
            await self.app(scope, body.receive, body.answer_then_drop(send_timed))
        finally:
            self.state.inflight -= 1
            self.state.unreserve(scope)  # a request that ended before queuing its image
            if self.state.request_memory is not None:
                self.state.request_memory.release(scope)
            if not started:  # raised before answering: Starlette's error handler answers 500
                metrics.count_request(route_of(scope), 500)


class RequestBody:
    """A request's body stream, knowing whether the app read all of it. An answer given before the body is read
    (a refusal) is sent whole, and then the rest of the body is read and dropped, up to DROP_BYTES and for at
    most DROP_TIMEOUT_S, before the connection closes: a server that closes a connection with unread bytes makes
    the kernel send a reset, which can destroy the answer before the client reads it (2 of 64 refusals in a
    flood, benchmarks/flood.py; all of them when nothing is read). Answering first means the client has its
    refusal before the body's bytes have been carried (the median refusal of a flood halved). Reading bytes is
    cheap; decoding and parsing them is the work that admission spares. Bodies past DROP_BYTES (8 MiB: more than a
    PNG of the largest image the default pixel limit admits) are cut off unread: dropping four 31.5 MiB bodies
    doubled the median refusal time of a flood, and their clients may see a reset instead of the answer."""

    DROP_TIMEOUT_S = 2.0
    DROP_BYTES = 8 * 2**20

    def __init__(self, scope, receive, limit: int):
        self.limit = min(limit, self.DROP_BYTES)
        self._receive = receive
        headers = Headers(scope=scope)
        declared = headers.get("content-length", "")
        # HTTP/1.1: a request without content-length or transfer-encoding has no body (a GET): nothing to drop
        self.done = declared in ("", "0") and "transfer-encoding" not in headers
        self.droppable = not (declared.isdigit() and int(declared) > self.limit)  # too big to be worth reading

    async def receive(self):
        message = await self._receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            self.done = True
        return message

    def answer_then_drop(self, send):
        """`send`, except that the last part of an answer given before the body was all read goes out with
        more_body, the rest of the body is dropped, and only then does the answer end (and the connection close)."""
        async def sender(message):
            if message["type"] == "http.response.body" and not message.get("more_body", False) and not self.done:
                await send({**message, "more_body": True})
                await self.drop_rest()
                message = {"type": "http.response.body", "body": b""}
            await send(message)
        return sender

    async def drop_rest(self) -> None:
        async def drop():
            read = 0
            while not self.done and read <= self.limit:
                read += len((await self.receive()).get("body", b""))

        if not self.done and self.droppable:
            try:
                await asyncio.wait_for(drop(), self.DROP_TIMEOUT_S)
            except asyncio.TimeoutError:
                pass


def route_of(scope) -> str:
    """The metrics label of a request: its route's path template, once routing found one."""
    return getattr(scope.get("route"), "path", "unmatched")


def openapi_schema(app: FastAPI) -> dict:
    """FastAPI's schema plus the JSON request models that routes parse themselves (their bodies take several
    media types, so FastAPI cannot see them), and without FastAPI's own validation-error models: every 4xx
    answers ErrorBody."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in JSON_BODY_MODELS:
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(body.pop("$defs", {}))
            components[model.__name__] = body
        for unused in ("HTTPValidationError", "ValidationError"):
            components.pop(unused, None)
        for operations in schema.get("paths", {}).values():  # validation errors answer 400 ErrorBody instead
            for op in operations.values():
                default_422 = op.get("responses", {}).get("422", {})
                if "HTTPValidationError" in str(default_422):
                    del op["responses"]["422"]
        app.openapi_schema = schema
    return app.openapi_schema
