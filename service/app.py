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

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from starlette.concurrency import run_in_threadpool

import gqtok
from gqtok.core.artifact import ArtifactError
from gqtok.service import errors, memory
from gqtok.service.metrics import ServiceMetrics
from gqtok.service.routers import compression, health, models, tokens
from gqtok.service.schemas import JSON_BODY_MODELS
from gqtok.service.served import load_models, warm_up
from gqtok.service.settings import ServiceSettings
from gqtok.service.state import ServiceState

log = logging.getLogger("gqtok.service")
DOCS_ASSETS = "/docs/static"  # Swagger UI's JavaScript and CSS, served from the fastapi-offline package


def create_app(settings: ServiceSettings | None = None) -> FastAPI:
    settings = settings or ServiceSettings()
    state = ServiceState(settings, ServiceMetrics(), asyncio.Semaphore(settings.max_concurrent_coding),
                         ThreadPoolExecutor(settings.max_concurrent_coding, thread_name_prefix="coding"))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loaded = await run_in_threadpool(load_models, settings, state.metrics)
        state.models, state.default = loaded, settings.default_model or next(iter(loaded))
        if state.default not in loaded:
            raise ArtifactError(f"default model {state.default!r} is not among the loaded models {sorted(loaded)}")
        for model in loaded.values():
            model.tokenize.start()
            model.detokenize.start()
        for model in loaded.values():
            await run_in_threadpool(warm_up, model)
        if settings.max_memory_mb:
            await run_in_threadpool(apply_memory_budget, state)
        state.metrics.ready.set_function(lambda: float(all(m.ready for m in state.models.values())))
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
    install_gatekeeper(app, state)
    app.openapi = lambda: openapi_schema(app)
    return app


def apply_memory_budget(state: ServiceState) -> None:
    """Measure the warmed-up models and lower the pixel limits to what the memory budget allows."""
    settings = state.settings
    state.memory = memory.plan(settings.max_memory_mb, {mid: m.runtime for mid, m in state.models.items()})
    limits = state.memory.limits(settings.max_image_pixels, settings.max_batch_pixels)
    state.settings = settings.model_copy(update=limits)
    for model in state.models.values():
        model.tokenize.max_batch_pixels = model.detokenize.max_batch_pixels = limits["max_batch_pixels"]


def install_gatekeeper(app: FastAPI, state: ServiceState) -> None:
    """Middleware: auth, draining, in-flight count, per-route metrics and x-total-time, in that order."""
    settings, metrics = state.settings, state.metrics
    api_key = settings.api_key.get_secret_value().encode() if settings.api_key else None

    def refuse(e: errors.ServiceError, route: str) -> JSONResponse:
        metrics.count_request(route, e.status)
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.middleware("http")
    async def gatekeeper(request: Request, call_next):
        start = time.perf_counter()
        health = request.url.path.startswith("/health/")
        if api_key is not None and not health:
            given = request.headers.get("authorization", "")
            token = given[7:].encode() if given[:7].lower() == "bearer " else b""
            if not hmac.compare_digest(token, api_key):  # constant time whatever the length of the guess
                return refuse(errors.Unauthorized("missing or wrong API key (Authorization: Bearer KEY)"), "unauthorized")
        if state.draining and not health:
            return refuse(errors.ShuttingDown("server is shutting down", headers={"Retry-After": "1"}), "draining")
        if state.inflight >= settings.max_concurrent_requests and not health:  # admission before any work
            return refuse(errors.TooManyRequests(f"{state.inflight} requests in flight, the limit is "
                                                 f"{settings.max_concurrent_requests}; retry later",
                                                 headers={"Retry-After": "1"}), "overloaded")
        state.inflight += 1
        try:
            response = await call_next(request)
        except Exception:  # answered 500 by the outermost handler (errors.py); counted here all the same
            metrics.count_request(getattr(request.scope.get("route"), "path", "unmatched"), 500)
            raise
        finally:
            state.inflight -= 1
        route = request.scope.get("route")
        metrics.count_request(getattr(route, "path", "unmatched"), response.status_code)
        response.headers["x-total-time"] = f"{1e3 * (time.perf_counter() - start):.3f}"
        return response


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
