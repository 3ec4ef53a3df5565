"""Reading request bodies: size limits while streaming, JSON into the pydantic models of schemas.py, images
from raw, multipart or JSON bodies, and token grids from JSON or npy. Every refusal is a typed ServiceError."""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from fastapi import Request
from starlette.requests import ClientDisconnect
from pydantic import BaseModel, ValidationError

from gqtok.service import errors
from gqtok.service.images import MEDIA_TYPES
from gqtok.service.memory import BODY_COPIES
from gqtok.service.schemas import NPY, TokenizeRequest
from gqtok.service.served import ServedModel
from gqtok.service.settings import ServiceSettings


# JSON bodies are parsed (and base64 decoded, and token lists made arrays) one at a time on this thread: those
# calls hold the GIL for their whole length (about 0.2 s for 28 MiB), and several at once in the default pool kept
# the event loop, and so /metrics and /health, waiting behind all of them (benchmarks/hostile.py)
PARSER = ThreadPoolExecutor(1, thread_name_prefix="parse")


async def parsed(fn, *args):
    """fn(*args) on the parser thread."""
    return await asyncio.get_running_loop().run_in_executor(PARSER, fn, *args)


async def read_body(request: Request, limit: int, timeout_s: float, hold=None) -> bytes:
    """The body, refusing (413) as soon as it passes `limit` bytes, declared or streamed, and (408) when it has
    not all arrived within `timeout_s`; a client that disconnects raises ClientClosed. hold(n): takes the memory
    of n more bytes of a body whose length was not declared, as they arrive (a declared one took it at the door:
    app.Gatekeeper.memory_refusal)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise errors.PayloadTooLarge(f"request body is {declared} bytes; the limit is {limit}")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise errors.PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
                if hold is not None and not declared:
                    hold(BODY_COPIES * len(chunk))
                chunks.append(chunk)
    except TimeoutError:
        raise errors.BodyTimeout(f"the request body did not arrive within {timeout_s:g} s ({size} bytes came)") from None
    except ClientDisconnect:
        raise errors.ClientClosed(f"the client disconnected after {size} bytes of its body") from None
    request._body = b"".join(chunks)  # starlette's form() re-reads the body from here
    return request._body


def parse_json(body: bytes, model: type[BaseModel]):
    """JSON body -> a validated request model; 400 naming the field for anything else (NaN included)."""
    def no_constants(name):
        raise ValueError(f"{name} is not allowed")

    try:
        obj = json.loads(body, parse_constant=no_constants)
    except (ValueError, UnicodeDecodeError) as e:
        raise errors.InvalidRequest(f"body is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise errors.InvalidRequest("JSON body must be an object")
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        detail = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']}" for err in e.errors())
        raise errors.InvalidRequest(f"JSON body: {detail}") from None


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def wants_npy(request: Request) -> bool:
    return NPY in request.headers.get("accept", "")


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


async def image_payloads(request: Request, body: bytes,
                         settings: ServiceSettings) -> tuple[list[bytes], TokenizeRequest]:
    """Encoded images from a raw, multipart or JSON body, plus the JSON body's options (none set otherwise:
    raw and multipart bodies take theirs from the query)."""
    kind = media_type(request)
    no_options = TokenizeRequest(images=[])
    if kind in MEDIA_TYPES:
        return [body], no_options
    if kind == "multipart/form-data":
        try:
            form = await request.form(max_files=settings.max_images_per_request + 1, max_fields=16)
        except Exception as e:
            raise errors.InvalidRequest(f"malformed multipart body: {e}") from None
        parts = form.getlist("image")
        files = [p for p in parts if hasattr(p, "read")]
        if len(files) != len(parts):
            raise errors.InvalidRequest("multipart 'image' parts must be files")
        return [await p.read() for p in files], no_options
    if kind == "application/json":
        return await parsed(json_images, body)  # parsing and base64 off the event loop
    raise errors.UnsupportedMediaType(
        f"content type {kind or '(none)'} is not accepted; send image/png, image/jpeg, image/webp, "
        "multipart/form-data or application/json")


def json_images(body: bytes) -> tuple[list[bytes], TokenizeRequest]:
    """A JSON tokenize body -> (the decoded image files, its options)."""
    req = parse_json(body, TokenizeRequest)
    out = []
    for i, s in enumerate(req.images):
        try:
            out.append(b64decode_in_pieces(s))
        except (binascii.Error, ValueError):
            raise errors.InvalidImage(f"images[{i}] is not valid base64") from None
    return out, req


B64_PIECE_CHARS = 1 << 20  # a multiple of 4: whole quads, about 3 ms of decoding each


def b64decode_in_pieces(s: str) -> bytes:
    """base64.b64decode(s, validate=True), a piece at a time: one call on 28 MiB holds the GIL for about 70 ms,
    and every request the event loop serves meanwhile waits (a /metrics scrape, which needs the GIL many times,
    waited for several such calls). Padding is refused anywhere but at the end, as the one call does."""
    if "=" in s[:-2]:
        raise binascii.Error("padding before the end")
    return b"".join(base64.b64decode(s[i:i + B64_PIECE_CHARS], validate=True)
                    for i in range(0, len(s), B64_PIECE_CHARS)) if s else b""


def json_tokens_limit(models, max_pixels: int, max_grids: int) -> int:
    """The most bytes a JSON body of token grids can need within the limits (each token at most 10 digits and a
    comma and space, plus brackets, model name and options): a larger body is refused before it is parsed, so a
    huge JSON body never becomes millions of Python objects."""
    per_grid = max(m.manifest.tokens_per_position * -(-max_pixels // m.manifest.downsample**2) for m in models)
    return max_grids * per_grid * 12 + 64 * 1024


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
