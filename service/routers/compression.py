"""POST /v1/compress (one image -> the self-describing bitstream of gqtok.core.bitstream) and
POST /v1/decompress (bitstream -> image). With a GQ tokenizer, tokenizing and detokenizing go through the model's
batchers and entropy coding runs in threads, at most max_concurrent_coding at once; with a codec model
(?model=codec&quality=N) the whole round runs in one of those coding slots."""

from __future__ import annotations

import time

import numpy as np
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from gqtok.core.bitstream import MAX_GRID_SIDE, BitstreamError, Header
from gqtok.service import errors
from gqtok.service.images import decode_image, png_bytes, fit_image
from gqtok.service.memory import IMAGE_BYTES_PER_PIXEL
from gqtok.service.requests import image_payloads, media_type, npy_bytes, read_body, wants_npy
from gqtok.service.routers.tokens import IMAGE_BODY, RESPONSE_HEADERS
from gqtok.service.schemas import COMPRESSED, NPY, OCTET, PNG, PriorName, binary, request_body
from gqtok.service.schemas import errors as error_responses
from gqtok.service.state import ServiceState, get_state, response_headers

router = APIRouter(prefix="/v1", tags=["compression"])


@router.post("/compress", summary="Image -> compressed bitstream (application/x-gqtok)", openapi_extra=IMAGE_BODY,
             response_class=Response,
             responses={200: {**binary(COMPRESSED, description="The compressed image (docs/compression.md)"),
                              "headers": {**RESPONSE_HEADERS, "x-gqtok-bits-per-pixel": {"schema": {"type": "string"}},
                                          "x-gqtok-prior": {"schema": {"type": "string"}},
                                          "x-gqtok-quality": {"schema": {"type": "string"},
                                                              "description": "codec models: the quality coded at"},
                                          "x-coding-time": {"schema": {"type": "string"}}}},
                        **error_responses(400, 401, 404, 413, 415, 422, 429, 500, 503)})
async def compress(request: Request, state: ServiceState = Depends(get_state),
                   model: str | None = Query(None, description="Model id: a tokenizer (default: the server's default) "
                                                               "or a codec model (GET /v1/models lists both)"),
                   prior: PriorName | None = Query(None, description="Tokenizers: the entropy model (default: the "
                                                                     "model's strongest)"),
                   quality: int | None = Query(None, ge=1, le=255, description=(
                       "Codec models only: 1 (fewest bits) .. the model's qualities (GET /v1/models/{id}); "
                       "default: its default_quality"))):
    settings = state.settings
    body = await read_body(request, state.image_body_limit(media_type(request)), settings.body_timeout_s,
                           state.body_holder(request.scope))
    state.hold_parsed(request.scope, media_type(request), body)
    payloads, options = await image_payloads(request, body, settings)
    if len(payloads) != 1:
        raise errors.InvalidRequest(f"send exactly one image to compress, got {len(payloads)}")
    if (options.model or model) in state.codecs:
        return await compress_with_codec(request, state, state.codec(options.model or model), payloads[0], prior,
                                         quality)
    served = state.model(options.model or model)
    if quality is not None:
        raise errors.InvalidRequest(f"model {served.manifest.model_id} is a GQ tokenizer: it compresses at one rate; "
                                    f"quality applies to codec models (loaded: {sorted(state.codecs) or 'none'})")
    name = prior.value if prior else served.compressor.default_prior
    if name not in served.compressor.priors:
        raise errors.InvalidRequest(f"model {served.manifest.model_id} has no {name!r} prior; "
                                    f"choose from {', '.join(served.compressor.priors)}")
    state.admit(served.tokenize, 1)  # a full queue refuses before the image is decoded
    f = served.manifest.downsample
    await state.hold_images(request.scope, payloads, f)
    img = await run_in_threadpool(decode_image, payloads[0], settings.max_image_pixels, "image", settings.alpha, f)
    padded = fit_image(img, f, "pad")
    if max(padded.shape[:2]) // f > MAX_GRID_SIDE:
        raise errors.ImageTooLarge(f"image is {img.shape[1]}x{img.shape[0]}: its {padded.shape[1] // f}x"
                                   f"{padded.shape[0] // f} token grid is past the compressed format's "
                                   f"{MAX_GRID_SIDE} per side")
    (answer,), timing = await state.run_items(served.tokenize, [(padded.shape, padded)])
    ids = answer[0].astype(np.int64)  # tokenize_posterior's ids
    start = time.perf_counter()
    data = await state.run_coding(served.compressor.compress, ids, img.shape[:2], name)
    headers = response_headers(served, timing) | {
        "x-coding-time": f"{1e3 * (time.perf_counter() - start):.3f}", "x-gqtok-prior": name,
        "x-gqtok-bits-per-pixel": f"{8 * len(data) / (img.shape[0] * img.shape[1]):.6f}"}
    return Response(data, media_type=COMPRESSED, headers=headers)


async def compress_with_codec(request: Request, state: ServiceState, codec, payload: bytes,
                              prior: PriorName | None, quality: int | None) -> Response:
    """The codec's round in one coding slot: decode the image, encoder, side information, entropy coding."""
    settings, m = state.settings, codec.manifest
    if prior is not None:
        raise errors.InvalidRequest(f"model {m.model_id} is a codec: its latents are coded with its hyperprior; "
                                    "prior applies to GQ tokenizers")
    try:
        quality = codec.compressor.quality(quality)
    except ValueError as e:
        raise errors.InvalidRequest(str(e)) from None
    f = m.downsample
    await state.hold_images(request.scope, [payload], f)
    img = await run_in_threadpool(decode_image, payload, settings.max_image_pixels, "image", settings.alpha, f)
    padded_hw = [-(-side // f) for side in img.shape[:2]]
    if max(padded_hw) > MAX_GRID_SIDE:
        raise errors.ImageTooLarge(f"image is {img.shape[1]}x{img.shape[0]}: its {padded_hw[1]}x{padded_hw[0]} "
                                   f"latent grid is past the compressed format's {MAX_GRID_SIDE} per side")
    start = time.perf_counter()
    data = await state.run_coding(codec.compressor.compress, img, None, quality)
    headers = codec.headers | {
        "x-coding-time": f"{1e3 * (time.perf_counter() - start):.3f}", "x-gqtok-prior": "hyperprior",
        "x-gqtok-quality": str(quality),
        "x-gqtok-bits-per-pixel": f"{8 * len(data) / (img.shape[0] * img.shape[1]):.6f}"}
    return Response(data, media_type=COMPRESSED, headers=headers)


@router.post("/decompress", summary="Compressed bitstream -> image (PNG or npy)",
             openapi_extra=request_body({COMPRESSED: None, OCTET: None}), response_class=Response,
             responses={200: {**binary(PNG, NPY, description="The image (uint8 [H, W, 3] npy with Accept: "
                                                             "application/x-npy), at its original size"),
                              "headers": RESPONSE_HEADERS},
                        **error_responses(400, 401, 404, 413, 415, 422, 429, 500, 503)})
async def decompress(request: Request, state: ServiceState = Depends(get_state)):
    """The model is the one the stream's header names (it must be loaded)."""
    settings = state.settings
    body = await read_body(request, settings.max_body_bytes, settings.body_timeout_s, state.body_holder(request.scope))
    kind = media_type(request)
    if kind not in (COMPRESSED, OCTET):
        raise errors.UnsupportedMediaType(f"content type {kind or '(none)'} is not accepted; "
                                          f"send {COMPRESSED} or {OCTET}")
    try:
        header, _ = Header.unpack(body)
    except BitstreamError as e:
        raise errors.InvalidBitstream(str(e)) from None
    if header.codec == "dvae":
        served = state.codec(header.model_id)
    elif header.model_id in state.codecs:
        raise errors.InvalidBitstream(f"stream holds GQ tokens of a model named {header.model_id!r}, which is a codec "
                                      "model here: decode it with the tokenizer that made it")
    else:
        served = state.model(header.model_id)
    hh, ww = header.image_size
    if hh * ww > settings.max_image_pixels:
        raise errors.ImageTooLarge(f"stream decodes to {hh}x{ww} = {hh * ww} pixels; the limit is "
                                   f"{settings.max_image_pixels}")
    state.hold(request.scope, IMAGE_BYTES_PER_PIXEL * hh * ww, "the decoded image")
    start = time.perf_counter()
    if header.codec == "dvae":
        image, _ = await state.run_coding(served.compressor.decompress, body, settings.max_image_pixels)
        headers = served.headers | {"x-coding-time": f"{1e3 * (time.perf_counter() - start):.3f}"}
    else:
        ids, _ = await state.run_coding(served.compressor.decompress, body, settings.max_image_pixels)
        coding_ms = 1e3 * (time.perf_counter() - start)
        (image,), timing = await state.run_items(served.detokenize, [(ids.shape, ids)])
        image = image[:hh, :ww]
        headers = response_headers(served, timing) | {"x-coding-time": f"{coding_ms:.3f}"}
    if wants_npy(request):
        return Response(npy_bytes(image), media_type=NPY, headers=headers)
    return Response(await run_in_threadpool(png_bytes, image), media_type=PNG, headers=headers)
