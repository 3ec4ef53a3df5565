"""The tokenizer service: FastAPI routes over batched onnxruntime inference.

Routes (v1): POST /v1/tokenize, POST /v1/detokenize, POST /v1/compress,
POST /v1/decompress, GET /v1/models,
GET /v1/models/{id}, GET /v1/models/{id}/codebook; GET /health/live,
/health/ready, /metrics, /info; OpenAPI docs at /docs.

Every error is a JSON {"error", "error_type"} with the status of its
ServiceError class (service/errors.py); bad input never yields a 500.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import io
import json
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

import gqtok
from gqtok.core.artifact import CODEBOOK, ArtifactError, load_artifact
from gqtok.core.bitstream import BitstreamError, Codec, Header
from gqtok.core.priors import fit_record
from gqtok.service import errors
from gqtok.service.batcher import Batcher, Timing
from gqtok.service.images import MEDIA_TYPES, RESIZE_MODES, decode_image, encode_png, fit_to_grid
from gqtok.service.metrics import ServiceMetrics
from gqtok.service.runtime import TokenizerRuntime
from gqtok.service.settings import ServiceSettings

log = logging.getLogger("gqtok.service")
NPY = "application/x-npy"
COMPRESSED = "application/x-gqtok"  # what /v1/compress answers; /v1/decompress also takes application/octet-stream


@dataclass
class ServedModel:
    runtime: TokenizerRuntime
    tokenize: Batcher
    detokenize: Batcher
    codec: Codec
    prior_bits: dict  # prior -> held-out bits per token, as recorded when the priors were fitted
    ready: bool = False

    @property
    def manifest(self):
        return self.runtime.manifest

    @property
    def token_dtype(self):
        return np.uint16 if self.manifest.num_codes <= 2**16 else np.int32


def load_models(settings: ServiceSettings, metrics: ServiceMetrics) -> dict[str, ServedModel]:
    """Load, verify and wrap every model directory; raises ArtifactError naming what is wrong."""
    models: dict[str, ServedModel] = {}
    for directory in settings.models:
        artifact = load_artifact(directory)
        rt = TokenizerRuntime(artifact, device=settings.device, threads=settings.threads, selector=settings.selector)
        mid = artifact.manifest.model_id
        if mid in models:
            raise ArtifactError(f"two model directories share the model id {mid!r}")

        def observe(direction, mid=mid):
            return lambda t: metrics.observe_batch(mid, direction, t)

        common = dict(max_batch_size=settings.max_batch_size, max_delay_s=settings.max_queue_delay_ms / 1e3,
                      max_queue=settings.max_queue_size, max_batch_pixels=settings.max_batch_pixels)
        f = artifact.manifest.downsample
        models[mid] = ServedModel(
            runtime=rt,
            tokenize=Batcher(f"{mid}/tokenize", rt.tokenize, on_batch=observe("tokenize"),
                             pixels_of=lambda key: key[0] * key[1], **common),  # key: image shape (H, W, 3)
            detokenize=Batcher(f"{mid}/detokenize", rt.detokenize, on_batch=observe("detokenize"),
                               pixels_of=lambda key, f=f: key[1] * key[2] * f * f, **common),  # key: (T, h, w)
            codec=Codec(artifact),
            prior_bits=fit_record(artifact).get("heldout_bits_per_token", {}),
        )
        log.info("loaded model %s from %s on %s", mid, directory, rt.provider)
    return models


def warm_up(model: ServedModel) -> None:
    """One encode and decode before the model is reported ready."""
    f = model.manifest.downsample
    ids = model.runtime.tokenize(np.zeros((1, 2 * f, 2 * f, 3), np.uint8))
    model.runtime.detokenize(ids)
    model.ready = True


# -- request parsing -------------------------------------------------------------------------------------------
async def read_body(request: Request, limit: int) -> bytes:
    """The body, refusing (413) as soon as it passes `limit` bytes, declared or streamed."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise errors.PayloadTooLarge(f"request body is {declared} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise errors.PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    request._body = b"".join(chunks)  # starlette's form() re-reads the body from here
    return request._body


def parse_json(body: bytes) -> dict:
    def no_constants(name):
        raise ValueError(f"{name} is not allowed")

    try:
        obj = json.loads(body, parse_constant=no_constants)
    except (ValueError, UnicodeDecodeError) as e:
        raise errors.InvalidRequest(f"body is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise errors.InvalidRequest("JSON body must be an object")
    return obj


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def wants_npy(request: Request) -> bool:
    return NPY in request.headers.get("accept", "")


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


async def image_payloads(request: Request, body: bytes, settings: ServiceSettings) -> tuple[list[bytes], dict]:
    """Encoded images from a raw, multipart or JSON body, plus options found in a JSON body."""
    kind = media_type(request)
    if kind in MEDIA_TYPES:
        return [body], {}
    if kind == "multipart/form-data":
        try:
            form = await request.form(max_files=settings.max_images_per_request + 1, max_fields=16)
        except Exception as e:
            raise errors.InvalidRequest(f"malformed multipart body: {e}") from None
        parts = form.getlist("image")
        files = [p for p in parts if hasattr(p, "read")]
        if len(files) != len(parts):
            raise errors.InvalidRequest("multipart 'image' parts must be files")
        return [await p.read() for p in files], {}
    if kind == "application/json":
        obj = parse_json(body)
        images = obj.get("images")
        if not isinstance(images, list) or not all(isinstance(s, str) for s in images):
            raise errors.InvalidRequest('JSON body must hold "images": a list of base64 strings')
        out = []
        for i, s in enumerate(images):
            try:
                out.append(base64.b64decode(s, validate=True))
            except (binascii.Error, ValueError):
                raise errors.InvalidImage(f"images[{i}] is not valid base64") from None
        options = {k: obj[k] for k in ("model", "resize") if k in obj and obj[k] is not None}
        bad = [k for k, v in options.items() if not isinstance(v, str)]
        if bad:
            raise errors.InvalidRequest(f'"{bad[0]}" must be a string, got {type(options[bad[0]]).__name__}')
        return out, options
    raise errors.UnsupportedMediaType(
        f"content type {kind or '(none)'} is not accepted; send image/png, image/jpeg, image/webp, "
        "multipart/form-data or application/json")


def parse_tokens(tokens, model: ServedModel, max_pixels: int, max_grids: int) -> tuple[np.ndarray, bool]:
    """JSON lists or an npy array -> int64 [B, T, h, w] plus whether one grid was sent."""
    m = model.manifest
    t = m.tokens_per_position
    if isinstance(tokens, np.ndarray):
        arr = tokens
    else:
        try:
            arr = np.asarray(tokens, dtype=object)
        except ValueError:
            raise errors.InvalidTokens("tokens must be a rectangular grid (or list of grids) of integers") from None
        kinds = set(map(type, arr.ravel().tolist()))
        if kinds - {int}:  # JSON true/false or 1.0 would otherwise pass as integers
            names = ", ".join(sorted(k.__name__ for k in kinds - {int}))
            raise errors.InvalidTokens(f"tokens must be integer token ids in a rectangular grid; found {names}")
        if not kinds:
            raise errors.InvalidTokens("tokens must be integer token ids; got an empty grid")
        try:
            arr = arr.astype(np.int64)
        except OverflowError:
            raise errors.InvalidTokens(f"token ids must lie in [0, {m.num_codes}); got a value beyond int64") from None
    if arr.dtype == bool or arr.dtype.kind not in "iu":
        what = "rectangular" if arr.dtype == object else "integer"
        raise errors.InvalidTokens(f"tokens must be {what} token ids (got dtype {arr.dtype})"
                                   + (", a ragged list" if arr.dtype == object else ""))
    grid_ndim = 2 if t == 1 else 3
    if arr.ndim == grid_ndim:
        single, arr = True, arr[None]
    elif arr.ndim == grid_ndim + 1 or (t == 1 and arr.ndim == 4):
        single = False
    else:
        raise errors.InvalidTokens(f"tokens must be a grid of shape {'[h, w]' if t == 1 else f'[{t}, h, w]'} "
                                   f"or a list of them; got {arr.ndim} dimensions {list(arr.shape)}")
    if arr.ndim == 3:  # T == 1 list of 2-D grids
        arr = arr[:, None]
    if arr.shape[1] != t:
        raise errors.InvalidTokens(f"model {m.model_id} has {t} tokens per position; got {arr.shape[1]}")
    b, _, h, w = arr.shape
    if b == 0 or h == 0 or w == 0:
        raise errors.InvalidTokens(f"tokens have an empty dimension: {list(arr.shape)}")
    if b > max_grids:
        raise errors.InvalidTokens(f"{b} grids in one request; the limit is {max_grids}")
    f = m.downsample
    if h * w * f * f > max_pixels:
        raise errors.ImageTooLarge(f"a {h}x{w} grid decodes to {h * f}x{w * f} pixels; the limit is {max_pixels}")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= m.num_codes:
        raise errors.InvalidTokens(f"token ids must lie in [0, {m.num_codes}); got values in [{lo}, {hi}]")
    return arr.astype(np.int64), single


# -- the app ----------------------------------------------------------------------------------------------------
def create_app(settings: ServiceSettings | None = None) -> FastAPI:
    settings = settings or ServiceSettings()
    metrics = ServiceMetrics()
    state = {"models": {}, "default": None, "draining": False, "inflight": 0}
    coding = asyncio.Semaphore(settings.max_concurrent_coding)  # entropy coding holds a core per request

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        models = await run_in_threadpool(load_models, settings, metrics)
        state["models"] = models
        state["default"] = settings.default_model or next(iter(models))
        if state["default"] not in models:
            raise ArtifactError(f"default model {state['default']!r} is not among the loaded models {sorted(models)}")
        for model in models.values():
            model.tokenize.start()
            model.detokenize.start()
        for model in models.values():
            await run_in_threadpool(warm_up, model)
        metrics.set_ready(True)
        yield
        for model in models.values():
            await model.tokenize.stop()
            await model.detokenize.stop()

    app = FastAPI(title="gqtok", version=gqtok.__version__, lifespan=lifespan,
                  description="Gaussian Quant image tokenizer: images <-> integer token grids.")
    app.state.settings, app.state.state, app.state.metrics = settings, state, metrics

    def error_response(e: errors.ServiceError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    errors.install_handlers(app, log)

    api_key = settings.api_key.get_secret_value().encode() if settings.api_key else None

    @app.middleware("http")
    async def gatekeeper(request: Request, call_next):
        """Auth, draining, in-flight count, per-route metrics and x-total-time, in that order."""
        start = time.perf_counter()
        path = request.url.path
        health = path.startswith("/health/")
        if api_key is not None and not health:
            given = request.headers.get("authorization", "")
            token = given[7:].encode() if given[:7].lower() == "bearer " else b""
            if not hmac.compare_digest(token, api_key):  # constant time whatever the length of the guess
                response = error_response(errors.Unauthorized("missing or wrong API key (Authorization: Bearer KEY)"))
                metrics.count_request("unauthorized", response.status_code)
                return response
        if state["draining"] and not health:
            response = error_response(errors.ShuttingDown("server is shutting down", headers={"Retry-After": "1"}))
            metrics.count_request("draining", 503)
            return response
        state["inflight"] += 1
        try:
            response = await call_next(request)
        finally:
            state["inflight"] -= 1
        route = request.scope.get("route")
        metrics.count_request(getattr(route, "path", "unmatched"), response.status_code)
        response.headers["x-total-time"] = f"{1e3 * (time.perf_counter() - start):.3f}"
        return response

    def get_model(model_id: str | None) -> ServedModel:
        if model_id is not None and not isinstance(model_id, str):  # a JSON body can carry anything
            raise errors.InvalidRequest(f'"model" must be a string, got {type(model_id).__name__}')
        mid = model_id or state["default"]
        model = state["models"].get(mid)
        if model is None:
            raise errors.UnknownModel(f"unknown model {mid!r}; loaded: {sorted(state['models'])}")
        if not model.ready:
            raise errors.NotReady(f"model {mid} is still warming up", headers={"Retry-After": "1"})
        return model

    async def run_items(batcher: Batcher, items: list[tuple[tuple, np.ndarray]]) -> tuple[list[np.ndarray], Timing]:
        """Queue every item of one request, wait for all under the request timeout; worst timing of the lot."""
        if len(items) > batcher.max_queue:  # would be refused forever: not a reason to retry
            raise errors.PayloadTooLarge(f"{len(items)} items in one request; this server queues at most "
                                         f"{batcher.max_queue} per model")
        batcher.reserve(len(items))
        futures = [batcher.submit(key, payload) for key, payload in items]
        try:
            done = await asyncio.wait_for(asyncio.gather(*futures), settings.request_timeout_s)
        except TimeoutError:
            for fut in futures:
                fut.cancel()
            raise errors.RequestTimeout(f"request took longer than {settings.request_timeout_s:g} s",
                                        headers={"Retry-After": "1"}) from None
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise
        model_id, direction = batcher.name.split("/")
        for _, t in done:
            metrics.observe_queue(model_id, direction, t.queue_s)
        timing = Timing(max(t.queue_s for _, t in done), max(t.inference_s for _, t in done),
                        max(t.batch_size for _, t in done))
        return [out for out, _ in done], timing

    def timing_headers(t: Timing) -> dict[str, str]:
        return {"x-queue-time": f"{1e3 * t.queue_s:.3f}", "x-inference-time": f"{1e3 * t.inference_s:.3f}"}

    image_body = {"requestBody": {"required": True, "content": {
        "image/png": {"schema": {"type": "string", "format": "binary"}},
        "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
        "image/webp": {"schema": {"type": "string", "format": "binary"}},
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "image": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
        "application/json": {"schema": {"type": "object", "required": ["images"], "properties": {
            "images": {"type": "array", "items": {"type": "string", "format": "byte"}},
            "model": {"type": "string"}, "resize": {"type": "string", "enum": list(RESIZE_MODES)}}}}}}}

    @app.post("/v1/tokenize", openapi_extra=image_body, summary="Images -> token grids")
    async def tokenize(request: Request, model: str | None = None, resize: str | None = None):
        body = await read_body(request, settings.max_body_bytes)
        payloads, options = await image_payloads(request, body, settings)
        served = get_model(options.get("model") or model)
        mode = options.get("resize") or resize or "pad"
        if mode not in RESIZE_MODES:
            raise errors.InvalidRequest(f"resize must be one of {', '.join(RESIZE_MODES)}, got {mode!r}")
        if not payloads:
            raise errors.InvalidRequest("no images in the request")
        if len(payloads) > settings.max_images_per_request:
            raise errors.InvalidRequest(f"{len(payloads)} images in one request; the limit is "
                                        f"{settings.max_images_per_request}")
        f = served.manifest.downsample

        def decode_all():  # off the event loop: decoding can take milliseconds per image
            out = []
            for i, data in enumerate(payloads):
                name = "image" if len(payloads) == 1 else f"image {i}"
                img = decode_image(data, settings.max_image_pixels, name)
                out.append((img.shape[:2], fit_to_grid(img, f, mode, name)))
            return out

        images = await run_in_threadpool(decode_all)
        if wants_npy(request) and len({img.shape for _, img in images}) > 1:
            raise errors.NotAcceptable("images of different sizes cannot share one npy array; "
                                       "send them separately or ask for JSON")
        grids, timing = await run_items(served.tokenize, [(img.shape, img) for _, img in images])
        headers = timing_headers(timing)
        if wants_npy(request):
            return Response(npy_bytes(np.stack(grids).astype(served.token_dtype)), media_type=NPY, headers=headers)
        t = served.manifest.tokens_per_position
        results = [{
            "tokens": (g[0] if t == 1 else g).tolist(),
            "grid_size": list(g.shape[1:]),
            "tokens_per_position": t,
            "original_size": list(orig),
            "padded_size": list(img.shape[:2]),
        } for g, (orig, img) in zip(grids, images)]
        return JSONResponse({"model": served.manifest.model_id, "resize": mode, "results": results}, headers=headers)

    tokens_body = {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"type": "object", "required": ["tokens"], "properties": {
            "tokens": {"type": "array", "items": {}}, "model": {"type": "string"},
            "image_size": {"type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 2, "maxItems": 2}}}},
        NPY: {"schema": {"type": "string", "format": "binary"}}}}}

    @app.post("/v1/detokenize", openapi_extra=tokens_body, summary="Token grids -> images")
    async def detokenize(request: Request, model: str | None = None, image_size: str | None = None):
        """`image_size` may come as a query parameter "H,W" (for npy bodies) or in the JSON body."""
        body = await read_body(request, settings.max_body_bytes)
        kind = media_type(request)
        if image_size is not None:
            try:
                image_size = [int(v) for v in image_size.split(",")]
            except ValueError:
                raise errors.InvalidRequest(f"image_size must be H,W, got {image_size!r}") from None
        if kind == NPY:
            try:
                tokens = np.load(io.BytesIO(body), allow_pickle=False)
            except Exception:
                raise errors.InvalidTokens("body is not a valid .npy array") from None
        elif kind == "application/json":
            obj = parse_json(body)
            if "tokens" not in obj:
                raise errors.InvalidRequest('JSON body must hold "tokens"')
            tokens, model = obj["tokens"], obj.get("model") or model
            image_size = obj.get("image_size", image_size)
        else:
            raise errors.UnsupportedMediaType(f"content type {kind or '(none)'} is not accepted; "
                                              f"send application/json or {NPY}")
        served = get_model(model)
        grids, single = parse_tokens(tokens, served, settings.max_image_pixels, settings.max_images_per_request)
        f = served.manifest.downsample
        if image_size is not None:
            ok = (isinstance(image_size, list) and len(image_size) == 2
                  and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in image_size))
            if not ok:
                raise errors.InvalidRequest("image_size must be [H, W], two positive integers")
            if image_size[0] > grids.shape[2] * f or image_size[1] > grids.shape[3] * f:
                raise errors.InvalidRequest(f"image_size {image_size} is larger than the decoded "
                                            f"{grids.shape[2] * f}x{grids.shape[3] * f}")
        images, timing = await run_items(served.detokenize, [(g.shape, g) for g in grids])
        if image_size is not None:
            images = [img[: image_size[0], : image_size[1]] for img in images]
        headers = timing_headers(timing)
        if wants_npy(request):
            return Response(npy_bytes(np.stack(images)), media_type=NPY, headers=headers)
        pngs = await run_in_threadpool(lambda: [encode_png(img) for img in images])
        if single:
            return Response(pngs[0], media_type="image/png", headers=headers)
        return JSONResponse({"model": served.manifest.model_id,
                             "images": [base64.b64encode(p).decode() for p in pngs]}, headers=headers)

    async def run_coding(fn, *args):
        """Entropy coding in a worker thread, at most max_concurrent_coding at once, under the request timeout."""
        async def guarded():
            async with coding:
                return await run_in_threadpool(fn, *args)

        try:
            return await asyncio.wait_for(guarded(), settings.request_timeout_s)
        except TimeoutError:
            raise errors.RequestTimeout(f"entropy coding took longer than {settings.request_timeout_s:g} s",
                                        headers={"Retry-After": "1"}) from None
        except BitstreamError as e:
            raise errors.InvalidBitstream(str(e)) from None

    @app.post("/v1/compress", openapi_extra=image_body, summary="Image -> compressed bitstream (application/x-gqtok)")
    async def compress(request: Request, model: str | None = None, prior: str | None = None):
        """One image -> the self-describing bitstream of gqtok/bitstream.py. `prior`: uniform, frequency or
        context, as far as the model has them (GET /v1/models/{id} lists them); default: the strongest."""
        body = await read_body(request, settings.max_body_bytes)
        payloads, options = await image_payloads(request, body, settings)
        served = get_model(options.get("model") or model)
        if len(payloads) != 1:
            raise errors.InvalidRequest(f"send exactly one image to compress, got {len(payloads)}")
        prior = prior or served.codec.default_prior
        if prior not in served.codec.priors:
            raise errors.InvalidRequest(f"model {served.manifest.model_id} has no {prior!r} prior; "
                                        f"choose from {', '.join(served.codec.priors)}")
        f = served.manifest.downsample
        img = await run_in_threadpool(decode_image, payloads[0], settings.max_image_pixels)
        padded = fit_to_grid(img, f, "pad")
        (ids,), timing = await run_items(served.tokenize, [(padded.shape, padded)])
        start = time.perf_counter()
        data = await run_coding(served.codec.encode, ids, img.shape[:2], prior)
        headers = timing_headers(timing) | {
            "x-coding-time": f"{1e3 * (time.perf_counter() - start):.3f}", "x-gqtok-prior": prior,
            "x-gqtok-bits-per-pixel": f"{8 * len(data) / (img.shape[0] * img.shape[1]):.6f}"}
        return Response(data, media_type=COMPRESSED, headers=headers)

    compressed_body = {"requestBody": {"required": True, "content": {
        COMPRESSED: {"schema": {"type": "string", "format": "binary"}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}

    @app.post("/v1/decompress", openapi_extra=compressed_body, summary="Compressed bitstream -> image (PNG or npy)")
    async def decompress(request: Request):
        """The model is the one the stream's header names (it must be loaded); answers PNG, or uint8
        [H, W, 3] npy when the request accepts application/x-npy."""
        body = await read_body(request, settings.max_body_bytes)
        kind = media_type(request)
        if kind not in (COMPRESSED, "application/octet-stream"):
            raise errors.UnsupportedMediaType(f"content type {kind or '(none)'} is not accepted; "
                                              f"send {COMPRESSED} or application/octet-stream")
        try:
            header, _ = Header.unpack(body)
        except BitstreamError as e:
            raise errors.InvalidBitstream(str(e)) from None
        served = get_model(header.model_id)
        hh, ww = header.image_size
        if hh * ww > settings.max_image_pixels:
            raise errors.ImageTooLarge(f"stream decodes to {hh}x{ww} = {hh * ww} pixels; the limit is "
                                       f"{settings.max_image_pixels}")
        start = time.perf_counter()
        ids, _ = await run_coding(served.codec.decode, body)
        coding_ms = 1e3 * (time.perf_counter() - start)
        (image,), timing = await run_items(served.detokenize, [(ids.shape, ids)])
        image = image[:hh, :ww]
        headers = timing_headers(timing) | {"x-coding-time": f"{coding_ms:.3f}", "x-gqtok-model": header.model_id}
        if wants_npy(request):
            return Response(npy_bytes(image), media_type=NPY, headers=headers)
        return Response(await run_in_threadpool(encode_png, image), media_type="image/png", headers=headers)

    def model_metadata(served: ServedModel) -> dict:
        m = served.manifest
        return {
            "model_id": m.model_id, "model_version": m.model_version, "ready": served.ready,
            "downsample": m.downsample, "latent_channels": m.latent_channels, "token_dim": m.token_dim,
            "tokens_per_position": m.tokens_per_position, "num_codes": m.num_codes,
            "bits_per_token": float(np.log2(m.num_codes)), "token_layout": m.token_layout, "gq_beta": m.gq_beta,
            "npy_token_dtype": np.dtype(served.token_dtype).name,
            "codebook": m.codebook.model_dump(), "input": m.input.model_dump(),
            "provider": served.runtime.provider, "eval": m.eval,
            "priors": {name: {"heldout_bits_per_token": served.prior_bits.get(name)} for name in served.codec.priors},
            "limits": {"max_image_pixels": settings.max_image_pixels, "max_batch_size": settings.max_batch_size,
                       "max_batch_pixels": settings.max_batch_pixels,
                       "max_images_per_request": settings.max_images_per_request,
                       "max_body_bytes": settings.max_body_bytes, "request_timeout_s": settings.request_timeout_s},
        }

    @app.get("/v1/models", summary="Loaded models")
    async def list_models():
        return {"default": state["default"], "models": [model_metadata(m) for m in state["models"].values()]}

    @app.get("/v1/models/{model_id}", summary="One model's metadata")
    async def get_model_info(model_id: str):
        if model_id not in state["models"]:
            raise errors.UnknownModel(f"unknown model {model_id!r}; loaded: {sorted(state['models'])}")
        return model_metadata(state["models"][model_id])

    @app.get("/v1/models/{model_id}/codebook", summary="The model's codebook, float32 [K, d]")
    async def get_codebook(model_id: str, format: str = "npy"):
        if model_id not in state["models"]:
            raise errors.UnknownModel(f"unknown model {model_id!r}; loaded: {sorted(state['models'])}")
        served = state["models"][model_id]
        if format == "npy":
            return Response(npy_bytes(served.runtime.artifact.codebook), media_type=NPY)
        if format == "safetensors":
            return Response(served.runtime.artifact.path(CODEBOOK).read_bytes(), media_type="application/octet-stream")
        raise errors.InvalidRequest(f"format must be npy or safetensors, got {format!r}")

    @app.get("/health/live", summary="The process answers")
    async def live():
        return {"live": True}

    @app.get("/health/ready", summary="Models loaded, verified and warmed up")
    async def ready():
        models = {mid: m.ready for mid, m in state["models"].items()}
        ok = bool(models) and all(models.values()) and not state["draining"]
        return JSONResponse({"ready": ok, "draining": state["draining"], "models": models}, status_code=200 if ok else 503)

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus():
        for mid, m in state["models"].items():
            metrics.set_queue_depth(mid, "tokenize", m.tokenize.depth)
            metrics.set_queue_depth(mid, "detokenize", m.detokenize.depth)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/info", summary="Version, models, providers and limits")
    async def info():
        import onnxruntime

        return {
            "name": "gqtok", "version": gqtok.__version__, "onnxruntime": onnxruntime.__version__,
            "default_model": state["default"], "models": sorted(state["models"]),
            "providers": {mid: m.runtime.provider for mid, m in state["models"].items()},
            "selector": {mid: m.runtime.selector for mid, m in state["models"].items()}, "threads": settings.threads, "auth": api_key is not None,
            "limits": {k: getattr(settings, k) for k in (
                "max_batch_size", "max_batch_pixels", "max_queue_delay_ms", "max_queue_size", "max_images_per_request", "max_body_bytes",
                "max_image_pixels", "request_timeout_s")},
        }

    return app
