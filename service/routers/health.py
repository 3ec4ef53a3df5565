"""GET /health/live, /health/ready, /metrics (Prometheus) and /info."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

import gqtok
from gqtok.service.schemas import Info, Live, Ready
from gqtok.service.schemas import errors as error_responses
from gqtok.service.state import ServiceState, get_state

router = APIRouter(tags=["health"])


@router.get("/health/live", summary="The process answers", response_model=Live)
async def live():
    return {"live": True}


@router.get("/health/ready", summary="Models loaded, verified and warmed up", response_model=Ready,
            responses={503: {"model": Ready, "description": "not ready yet, or draining"}})
async def ready(state: ServiceState = Depends(get_state)):
    models = {mid: m.ready for mid, m in [*state.models.items(), *state.codecs.items()]}
    saturated = state.saturated
    ok = bool(models) and all(models.values()) and not state.draining and not saturated
    return JSONResponse({"ready": ok, "draining": state.draining, "saturated": saturated, "models": models},
                        status_code=200 if ok else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}},
                             "description": "Prometheus text exposition format"}})
async def prometheus(state: ServiceState = Depends(get_state)):
    for mid, m in state.models.items():
        state.metrics.set_queue_depth(mid, "tokenize", m.tokenize.depth)
        state.metrics.set_queue_depth(mid, "detokenize", m.detokenize.depth)
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/info", summary="Version, models, providers and limits", response_model=Info,
            responses=error_responses(401, 503))
async def info(state: ServiceState = Depends(get_state)):
    import onnxruntime

    settings = state.settings
    return {
        "name": "gqtok", "version": gqtok.__version__, "onnxruntime": onnxruntime.__version__,
        "default_model": state.default, "models": sorted(state.models), "codecs": sorted(state.codecs),
        "providers": {mid: m.runtime.provider for mid, m in state.models.items()},
        "selector": {mid: m.runtime.selector for mid, m in state.models.items()}, "threads": settings.threads,
        "auth": settings.api_key is not None,
        "limits": {k: getattr(settings, k) for k in (
            "max_batch_size", "max_batch_pixels", "max_queue_delay_ms", "max_queue_size", "max_images_per_request",
            "max_body_bytes", "max_image_pixels", "request_timeout_s", "max_concurrent_requests", "max_memory_mb")},
        "memory": state.memory.info() | {"requests_mb": round(state.request_memory.budget / 2**20, 1),
                                         "requests_held_mb": round(state.request_memory.held / 2**20, 1)}
        if state.memory else None,
    }
