"""POST /v1/tokenize (images -> token grids) and POST /v1/detokenize (token grids -> images)."""

from __future__ import annotations

import base64
import io

import numpy as np
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from gqtok.service import errors
from gqtok.core.layout import budget_size
from gqtok.photos import resize_rgb
from gqtok.service.images import FORMATS, decode_image, fit_image, png_bytes
from gqtok.service.requests import (image_payloads, json_tokens_limit, media_type, npy_bytes, parse_json, parse_tokens,
                                    parsed, read_body, wants_npy)
from gqtok.service.schemas import (NPY, PNG, DetokenizeRequest, DetokenizeResponse, Fit,
                                   MultipartImages, TokenizeRequest, TokenizeResponse, binary, request_body)
from gqtok.service.schemas import errors as error_responses
from gqtok.service.batcher import Timing
from gqtok.service.memory import IMAGE_BYTES_PER_PIXEL, JSON_TOKEN_BYTES
from gqtok.service.state import ServiceState, get_state, response_headers

router = APIRouter(prefix="/v1", tags=["tokens"])

IMAGE_BODY = request_body({**{m: None for m in FORMATS.values()}, "multipart/form-data": MultipartImages,
                           "application/json": TokenizeRequest})
RESPONSE_HEADERS = {  # state.response_headers
    "x-gqtok-model": {"description": "id of the model that answered", "schema": {"type": "string"}},
    "x-gqtok-model-version": {"description": "its version", "schema": {"type": "string"}},
    "x-gqtok-model-digest": {"description": "its model digest (networks and codebook)", "schema": {"type": "string"}},
    "x-gqtok-codebook-sha256": {"description": "its codebook's digest", "schema": {"type": "string"}},
    "x-queue-time": {"description": "ms queued", "schema": {"type": "string"}},
    "x-inference-time": {"description": "ms of the inference call", "schema": {"type": "string"}}}


NPY_SIZES = {  # the sizes a JSON answer gives per image, for an npy answer
    "x-gqtok-original-size": {"description": "npy answers: H,W of each image as displayed, ';'-separated",
                              "schema": {"type": "string"}},
    "x-gqtok-resized-size": {"description": "npy answers: H,W of each image after the token budget, ';'-separated",
                             "schema": {"type": "string"}},
    "x-gqtok-padded-size": {"description": "npy answers: H,W of each image after fit, ';'-separated",
                            "schema": {"type": "string"}}}


@router.post("/tokenize", summary="Images -> token grids", openapi_extra=IMAGE_BODY, response_model=TokenizeResponse,
             responses={200: {"content": {NPY: {"schema": {"type": "string", "format": "binary"}}},
                              "headers": RESPONSE_HEADERS | NPY_SIZES,
                              "description": "JSON grids, or with Accept: application/x-npy one array "
                                             "(batch, T, h, w), uint16 when K <= 65536, else int32"},
                        **error_responses(400, 401, 404, 406, 413, 415, 422, 429, 500, 503)})
async def tokenize(request: Request, state: ServiceState = Depends(get_state),
                   model: str | None = Query(None, description="Model id (default: the server's default)"),
                   fit: Fit | None = Query(None, description="How sides become multiples of f (default pad)"),
                   resize: Fit | None = Query(None, deprecated=True, description="Deprecated name of fit"),
                   posterior: bool = Query(False, description=(
                       "JSON answers also give each token's KL to N(0, I) in bits (kl_bits) and the mean of its "
                       "posterior sigmas (sigma_mean), grids like tokens")),
                   max_tokens: int | None = Query(None, ge=1, description=(
                       "Token budget: each image is first resized (aspect kept, never enlarged) so that its grid "
                       "has at most this many tokens (resized_size in the answer)"))):
    settings = state.settings  # one raw image meets a full queue in app.Gatekeeper, before its body is read
    body = await read_body(request, state.image_body_limit(media_type(request)), settings.body_timeout_s,
                           state.body_holder(request.scope))
    state.hold_parsed(request.scope, media_type(request), body)
    payloads, options = await image_payloads(request, body, settings)
    served = state.model(options.model or model)
    mode = (options.fit or options.resize or fit or resize or Fit.pad).value
    if not payloads:
        raise errors.InvalidRequest("no images in the request")
    if len(payloads) > settings.max_images_per_request:
        raise errors.InvalidRequest(f"{len(payloads)} images in one request; the limit is "
                                    f"{settings.max_images_per_request}")
    f, t = served.manifest.downsample, served.manifest.tokens_per_position
    budget = options.max_tokens or max_tokens
    if budget is not None and budget < t:
        raise errors.InvalidRequest(f"max_tokens={budget} is less than one position's {t} tokens "
                                    f"(model {served.manifest.model_id})")
    state.admit(served.tokenize, len(payloads), request.scope)  # a full queue refuses before any decoding
    await state.hold_images(request.scope, payloads, f)  # and so does a full memory

    def decode_all():  # off the event loop: decoding can take milliseconds per image
        out = []
        for i, data in enumerate(payloads):
            name = "image" if len(payloads) == 1 else f"image {i}"
            try:
                img = decode_image(data, settings.max_image_pixels, name, settings.alpha, f)
                original = img.shape[:2]
                if budget is not None:
                    img = resize_rgb(img, budget_size(*original, f, t, budget))
                out.append((original, img.shape[:2], fit_image(img, f, mode, name)))
            except errors.ServiceError as e:
                out.append(e)
        return out

    decoded = await run_in_threadpool(decode_all)
    failed = [d for d in decoded if isinstance(d, errors.ServiceError)]
    npy = wants_npy(request)
    if failed and (npy or len(decoded) == 1):  # one image, or one array: its error is the request's
        raise failed[0]
    images = [d for d in decoded if not isinstance(d, errors.ServiceError)]
    if npy and len({img.shape for _, _, img in images}) > 1:
        raise errors.NotAcceptable("images of different sizes cannot share one npy array; "
                                   "send them separately or ask for JSON")
    answers, timing = await state.run_items(served.tokenize, [(img.shape, img) for _, _, img in images],
                                            request.scope) if images else ([], Timing())
    grids = [a[0].astype(np.int64) for a in answers]  # rt.tokenize_posterior: ids, KL bits, mean sigma
    headers = response_headers(served, timing)
    if npy:
        headers |= {"x-gqtok-original-size": ";".join(f"{h},{w}" for (h, w), _, _ in images),
                    "x-gqtok-resized-size": ";".join(f"{h},{w}" for _, (h, w), _ in images),
                    "x-gqtok-padded-size": ";".join(f"{img.shape[0]},{img.shape[1]}" for _, _, img in images)}
        return Response(npy_bytes(np.stack(grids).astype(served.token_dtype)), media_type=NPY, headers=headers)
    want_posterior = posterior or bool(options.posterior)

    def as_grid(a: np.ndarray, digits: int | None = None) -> list:
        a = a[0] if t == 1 else a
        return (np.round(a, digits) if digits is not None else a).tolist()

    results, done = [], iter(zip(grids, answers, images))
    for d in decoded:
        if isinstance(d, errors.ServiceError):
            results.append({"status": d.status, **d.body()})
            continue
        g, answer, (orig, resized, img) = next(done)
        result = {"status": 200, "tokens": as_grid(g), "grid_size": list(g.shape[1:]), "tokens_per_position": t,
                  "original_size": list(orig), "resized_size": list(resized), "padded_size": list(img.shape[:2])}
        if want_posterior:
            result |= {"kl_bits": as_grid(answer[1], 3), "sigma_mean": as_grid(answer[2], 6)}
        results.append(result)
    return JSONResponse({"model": served.manifest.model_id, "model_digest": served.model_digest, "fit": mode,
                         "results": results}, headers=headers)


@router.post("/detokenize", summary="Token grids -> images",
             openapi_extra=request_body({"application/json": DetokenizeRequest, NPY: None}),
             responses={200: {**binary(PNG, NPY, json_model=DetokenizeResponse, description=(
                 "One grid: image/png; several: JSON of base64 PNGs; with Accept: application/x-npy: uint8 "
                 "(batch, H, W, 3)")), "headers": RESPONSE_HEADERS},
                        **error_responses(400, 401, 404, 409, 413, 415, 422, 429, 500, 503)})
async def detokenize(request: Request, state: ServiceState = Depends(get_state),
                     model: str | None = Query(None, description="Model id (default: the server's default)"),
                     image_size: str | None = Query(None, pattern=r"^\d+,\d+$",
                                                    description="H,W to crop the images to (for npy bodies)"),
                     output_size: str | None = Query(None, pattern=r"^\d+,\d+$", description=(
                         "H,W to resize the (cropped) images to, bicubic (for npy bodies): a token budget's "
                         "original_size")),
                     model_digest: str | None = Query(None, description=(
                         "The model_digest of the tokenize answer that made the tokens (for npy bodies): 409 "
                         "unless the model decoding them is the same export"))):
    settings = state.settings
    kind = media_type(request)
    # JSON token grids past what the limits can need are refused unread (413), so a huge body never becomes
    # millions of Python objects
    json_limit = json_tokens_limit(state.models.values(), settings.max_image_pixels, settings.max_images_per_request)
    body = await read_body(request, min(settings.max_body_bytes, json_limit) if kind == "application/json"
                           else settings.max_body_bytes, settings.body_timeout_s, state.body_holder(request.scope))
    size = [int(v) for v in image_size.split(",")] if image_size is not None else None
    out_size = [int(v) for v in output_size.split(",")] if output_size is not None else None
    if kind == NPY:
        try:
            tokens = np.load(io.BytesIO(body), allow_pickle=False)
        except Exception:
            raise errors.InvalidTokens("body is not a valid .npy array") from None
    elif kind == "application/json":
        state.hold(request.scope, JSON_TOKEN_BYTES * len(body), "the parsed JSON token grids")
        req = await parsed(parse_json, body, DetokenizeRequest)  # off the event loop
        tokens, model = req.tokens, req.model or model
        size = req.image_size if req.image_size is not None else size
        out_size = req.output_size if req.output_size is not None else out_size
        model_digest = req.model_digest or model_digest
    else:
        raise errors.UnsupportedMediaType(f"content type {kind or '(none)'} is not accepted; "
                                          f"send application/json or {NPY}")
    served = state.model(model)
    if model_digest is not None and model_digest != served.model_digest:
        raise errors.ModelMismatch(f"these tokens were made by the export with model digest {model_digest[:12]}; "
                                   f"model {served.manifest.model_id} here is {served.model_digest[:12]} "
                                   f"(version {served.manifest.model_version}): it would decode them into another "
                                   "picture")
    grids, single = await parsed(parse_tokens, tokens, served, settings.max_image_pixels,
                                            settings.max_images_per_request)
    f = served.manifest.downsample
    b, _, h, w = grids.shape
    state.hold(request.scope, IMAGE_BYTES_PER_PIXEL * b * h * w * f * f, f"{b} decoded image(s)")
    if size is not None:
        if min(size) < 1:
            raise errors.InvalidRequest("image_size must be [H, W], two positive integers")
        if size[0] > grids.shape[2] * f or size[1] > grids.shape[3] * f:
            raise errors.InvalidRequest(f"image_size {size} is larger than the decoded "
                                        f"{grids.shape[2] * f}x{grids.shape[3] * f}")
    if out_size is not None:
        if min(out_size) < 1 or out_size[0] * out_size[1] > settings.max_image_pixels:
            raise errors.InvalidRequest(f"output_size must be [H, W], two positive integers with H * W at most "
                                        f"{settings.max_image_pixels} (the pixel limit); got {out_size}")
        state.hold(request.scope, IMAGE_BYTES_PER_PIXEL * b * out_size[0] * out_size[1], f"{b} resized image(s)")
    images, timing = await state.run_items(served.detokenize, [(g.shape, g) for g in grids])
    if size is not None:
        images = [img[: size[0], : size[1]] for img in images]
    if out_size is not None:
        images = await run_in_threadpool(lambda: [resize_rgb(img, tuple(out_size)) for img in images])
    headers = response_headers(served, timing)
    if wants_npy(request):
        return Response(npy_bytes(np.stack(images)), media_type=NPY, headers=headers)
    pngs = await run_in_threadpool(lambda: [png_bytes(img) for img in images])
    if single:
        return Response(pngs[0], media_type=PNG, headers=headers)
    return JSONResponse({"model": served.manifest.model_id, "model_digest": served.model_digest,
                         "images": [base64.b64encode(p).decode() for p in pngs]}, headers=headers)
