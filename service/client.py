"""Python client of the gqtok tokenizer service (HTTP API v1), sync and async.

    with TokenizerClient("http://127.0.0.1:8000") as tok:
        ids = tok.tokenize(["a.jpg", "b.jpg"])        # uint16 [batch, t, h, w]
        images = tok.detokenize(ids)                   # list of PIL images
        data = tok.compress("a.jpg")                   # bytes: tokens entropy-coded
        image = tok.decompress(data)                   # PIL image at the original size

Needs httpx, numpy and Pillow only (no torch). Request building, the retry
policy and response parsing are plain functions shared by both classes; the
classes only send and sleep.
"""

from __future__ import annotations

import asyncio
import email.utils
import io
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np
from PIL import Image

NPY = "application/x-npy"
COMPRESSED = "application/x-gqtok"
RESIZE_MODES = ("pad", "crop", "exact")

# 429 (queue full) and 503 (warming up, draining, request timed out) are the server asking us to come
# back later, usually with Retry-After; every other error is an answer about this request and is final.
RETRY_STATUSES = frozenset({429, 503})
# Failures to reach the server or to get an answer at all (connection refused or reset, a keep-alive
# connection closed under us). Read timeouts are not retried: the server may still be working on it.
RETRY_ERRORS = (httpx.NetworkError, httpx.RemoteProtocolError, httpx.ConnectTimeout)

# Patched by the tests to record waits instead of sleeping.
_sleep = time.sleep
_async_sleep = asyncio.sleep

ImageLike = Any  # PIL.Image.Image | np.ndarray (uint8 HxWx3) | bytes (an encoded file) | str | Path (a file)


class TokenizerError(Exception):
    """An error answer from the service (or no answer at all: status None)."""

    def __init__(self, message: str, *, status: int | None = None, error_type: str | None = None,
                 retry_after: float | None = None):
        super().__init__(message)
        self.message, self.status, self.error_type, self.retry_after = message, status, error_type, retry_after

    def __str__(self) -> str:
        return f"{self.status or 'no response'} {self.error_type}: {self.message}"


# -- encoding requests -------------------------------------------------------------------------------------------
def _sniff(data: bytes) -> str | None:
    """Media type of an encoded PNG, JPEG or WebP file, from its magic bytes."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def _png(img: Image.Image) -> bytes:
    if img.mode not in ("RGB", "RGBA", "L", "LA", "P", "1"):  # modes PNG cannot hold (CMYK, F, ...)
        img = img.convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)  # lossless; level 1 is fast and the upload is local
    return buf.getvalue()


def encode_image(image: ImageLike) -> tuple[bytes, str]:
    """One image -> (encoded bytes, media type). Arrays and PIL images become PNG (lossless);
    bytes and files go as they are (the server judges formats it does not accept)."""
    if isinstance(image, (str, Path)):
        image = Path(image).read_bytes()
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        # unknown formats are still sent: the server's answer names them (e.g. "image is GIF")
        return data, _sniff(data) or "image/png"
    if isinstance(image, Image.Image):
        return _png(image), "image/png"
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"image arrays must be uint8 (got {image.dtype}); scale and cast them first")
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4))):
            raise ValueError(f"image arrays must be HxWx3 (or HxW, HxWx4); got shape {image.shape}")
        return _png(Image.fromarray(np.ascontiguousarray(image))), "image/png"
    raise TypeError(f"cannot send {type(image).__name__} as an image; "
                    "use a PIL image, a uint8 array, encoded bytes or a file path")


def _as_list(images) -> list:
    """One image or several -> a list (a 4-D uint8 array is a batch)."""
    if isinstance(images, (list, tuple)):
        out = list(images)
    elif isinstance(images, np.ndarray) and images.ndim == 4:
        out = list(images)
    else:
        out = [images]
    if not out:
        raise ValueError("no images to tokenize")
    return out


@dataclass(frozen=True)
class _Call:
    """One HTTP request and how to read its success answer; shared by the sync and async clients."""

    method: str
    path: str
    parse: Callable[[httpx.Response], Any]
    params: dict = field(default_factory=dict)
    headers: dict = field(default_factory=dict)
    content: bytes | None = None
    files: list | None = None

    def send_kwargs(self) -> dict:
        kw: dict[str, Any] = {"params": self.params, "headers": self.headers}
        if self.content is not None:
            kw["content"] = self.content
        if self.files is not None:
            kw["files"] = self.files
        return kw


def _model_params(model: str | None, **extra) -> dict:
    params = {"model": model} if model else {}
    params.update({k: v for k, v in extra.items() if v is not None})
    return params


def _tokenize_call(images, resize: str, model: str | None, npy: bool) -> _Call:
    """One image -> a raw body; several -> multipart with repeated 'image' parts."""
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {', '.join(RESIZE_MODES)}, got {resize!r}")
    encoded = [encode_image(x) for x in _as_list(images)]
    headers = {"accept": NPY} if npy else {"accept": "application/json"}
    parse = _parse_npy if npy else _parse_json
    params = _model_params(model, resize=resize)
    if len(encoded) == 1:
        data, kind = encoded[0]
        return _Call("POST", "/v1/tokenize", parse, params, {**headers, "content-type": kind}, content=data)
    ext = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}
    files = [("image", (f"image{i}.{ext.get(kind, 'bin')}", data, kind)) for i, (data, kind) in enumerate(encoded)]
    return _Call("POST", "/v1/tokenize", parse, params, headers, files=files)


def _detokenize_call(tokens, image_size, model: str | None) -> _Call:
    """Token grids -> a .npy body (or JSON when image_size asks the server to crop); asks for npy back."""
    arr = np.asarray(tokens)
    if arr.dtype == bool or arr.dtype.kind not in "iu":
        raise TypeError(f"tokens must be integer token ids (got dtype {arr.dtype})")
    headers = {"accept": NPY}
    if image_size is None:
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
        return _Call("POST", "/v1/detokenize", _parse_images, _model_params(model), {**headers, "content-type": NPY},
                     content=buf.getvalue())
    if len(image_size) != 2:
        raise ValueError(f"image_size must be (H, W); got {image_size!r}")
    # The npy body has no place for image_size (the server reads it from a JSON body only), so the
    # crop request goes as JSON; the answer is still npy.
    body = {"tokens": arr.tolist(), "image_size": [int(v) for v in image_size]}
    if model:
        body["model"] = model
    return _Call("POST", "/v1/detokenize", _parse_images, {}, {**headers, "content-type": "application/json"},
                 content=json.dumps(body, separators=(",", ":")).encode())


def _compress_call(image, prior: str | None, model: str | None) -> _Call:
    data, kind = encode_image(image)
    return _Call("POST", "/v1/compress", lambda r: r.content, _model_params(model, prior=prior),
                 {"content-type": kind, "accept": COMPRESSED}, content=data)


def _decompress_call(data: bytes) -> _Call:
    return _Call("POST", "/v1/decompress", _parse_image, {}, {"content-type": COMPRESSED, "accept": NPY},
                 content=bytes(data))


def _get(path: str, parse=None, **params) -> _Call:
    return _Call("GET", path, parse or _parse_json, {k: v for k, v in params.items() if v is not None})


# -- reading answers ---------------------------------------------------------------------------------------------
def _parse_json(response: httpx.Response) -> dict:
    try:
        return response.json()
    except ValueError:
        raise TokenizerError(f"expected a JSON answer, got {response.headers.get('content-type')!r}",
                             status=response.status_code, error_type="bad_response") from None


def _parse_npy(response: httpx.Response) -> np.ndarray:
    try:
        return np.load(io.BytesIO(response.content), allow_pickle=False)
    except Exception:
        raise TokenizerError(f"expected a .npy answer, got {response.headers.get('content-type')!r}",
                             status=response.status_code, error_type="bad_response") from None


def _parse_images(response: httpx.Response) -> list[Image.Image]:
    arr = _parse_npy(response)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise TokenizerError(f"expected uint8 images [batch, H, W, 3], got {arr.dtype} {list(arr.shape)}",
                             status=response.status_code, error_type="bad_response")
    return [Image.fromarray(a) for a in arr]


def _parse_image(response: httpx.Response) -> Image.Image:
    arr = _parse_npy(response)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3:
        raise TokenizerError(f"expected a uint8 image [H, W, 3], got {arr.dtype} {list(arr.shape)}",
                             status=response.status_code, error_type="bad_response")
    return Image.fromarray(arr)


def _retry_after(value: str | None) -> float | None:
    """Retry-After as seconds: a number or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _error_from(response: httpx.Response) -> TokenizerError:
    """The server's {"error", "error_type"} body as a TokenizerError (or the raw text when it is not one)."""
    message, error_type = response.text[:1000] or response.reason_phrase, "http_error"
    try:
        body = response.json()
        if isinstance(body, dict) and "error" in body:
            message, error_type = str(body["error"]), str(body.get("error_type") or error_type)
    except ValueError:
        pass
    return TokenizerError(message, status=response.status_code, error_type=error_type,
                          retry_after=_retry_after(response.headers.get("retry-after")))


def _outcome(call: _Call, response: httpx.Response | None, error: Exception | None):
    """The final result of a call: its parsed answer, or a TokenizerError raised."""
    if error is not None:
        kind = "timeout" if isinstance(error, httpx.TimeoutException) else "connection_error"
        raise TokenizerError(f"{type(error).__name__}: {error}", error_type=kind) from error
    if response.is_success:
        return call.parse(response)
    raise _error_from(response)


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 5  # retries after the first attempt
    backoff: float = 0.2  # first wait, doubled each retry
    max_backoff: float = 5.0  # cap of the exponential wait
    max_retry_after: float = 60.0  # cap of a server's Retry-After, so a bad header cannot hang us

    def delay(self, attempt: int, response: httpx.Response | None, error: Exception | None) -> float | None:
        """Seconds to wait before retrying after `attempt` (0-based), or None when this outcome is final."""
        if attempt >= self.retries:
            return None
        if error is not None:
            if not isinstance(error, RETRY_ERRORS):
                return None
            asked = 0.0
        elif response.status_code in RETRY_STATUSES:
            asked = min(_retry_after(response.headers.get("retry-after")) or 0.0, self.max_retry_after)
        else:
            return None
        wait = max(min(self.backoff * 2**attempt, self.max_backoff), asked)
        return wait + random.uniform(0, 0.1 * wait + 0.01)  # jitter: concurrent clients do not return in step


def _client_kwargs(base_url: str, api_key: str | None, timeout: float, transport) -> dict:
    headers = {"user-agent": "gqtok-client"}
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    kw = {"base_url": base_url, "headers": headers, "timeout": timeout}
    if transport is not None:
        kw["transport"] = transport
    return kw


# -- the clients -------------------------------------------------------------------------------------------------
class TokenizerClient:
    """Synchronous client; use as a context manager or call close()."""

    # base_url: the service root. api_key: sent as "Authorization: Bearer KEY" (None: no header).
    # model: model id for every request (None: the server's default). timeout: seconds per HTTP attempt.
    # retries / backoff / max_backoff: on 429, 503 and connection errors retry up to `retries` times,
    # waiting backoff * 2**attempt seconds capped at max_backoff (or Retry-After when longer), plus jitter.
    # transport: an httpx transport, e.g. httpx.MockTransport in tests (None: real network).
    def __init__(self, base_url: str = "http://127.0.0.1:8000", *, api_key: str | None = None,
                 model: str | None = None, timeout: float = 60.0, retries: int = 5, backoff: float = 0.2,
                 max_backoff: float = 5.0, transport: httpx.BaseTransport | None = None):
        self.model = model
        self.policy = RetryPolicy(retries, backoff, max_backoff)
        self._http = httpx.Client(**_client_kwargs(base_url, api_key, timeout, transport))

    def _call(self, call: _Call):
        attempt = 0
        while True:
            response = error = None
            try:
                response = self._http.request(call.method, call.path, **call.send_kwargs())
            except httpx.TransportError as e:
                error = e
            delay = self.policy.delay(attempt, response, error)
            if delay is None:
                return _outcome(call, response, error)
            _sleep(delay)
            attempt += 1

    def tokenize(self, images, *, resize: str = "pad", model: str | None = None) -> np.ndarray:
        """Images (one or a list) -> token ids [batch, t, h, w] (uint16 when K <= 65536, else int32).
        All images must give the same grid size; for mixed sizes use tokenize_json."""
        return self._call(_tokenize_call(images, resize, model or self.model, npy=True))

    def tokenize_json(self, images, *, resize: str = "pad", model: str | None = None) -> dict:
        """Images -> the server's JSON answer: {"model", "results": [{"tokens", "grid_size", ...}]}."""
        return self._call(_tokenize_call(images, resize, model or self.model, npy=False))

    def detokenize(self, tokens, *, image_size=None, model: str | None = None) -> list[Image.Image]:
        """Token grids ([batch, t, h, w], [t, h, w], [h, w] or nested lists) -> RGB PIL images,
        cropped by the server to image_size (H, W) when given."""
        return self._call(_detokenize_call(tokens, image_size, model or self.model))

    def compress(self, image, *, prior: str | None = None, model: str | None = None) -> bytes:
        """One image -> the compressed bitstream (prior: uniform, frequency, context; default the strongest)."""
        return self._call(_compress_call(image, prior, model or self.model))

    def decompress(self, data: bytes) -> Image.Image:
        """A bitstream from compress (or gqtok compress) -> the RGB image at its original size."""
        return self._call(_decompress_call(data))

    def info(self) -> dict:
        return self._call(_get("/info"))

    def models(self) -> dict:
        return self._call(_get("/v1/models"))

    def model_info(self, model_id: str | None = None) -> dict:
        """Metadata of one model (default: this client's model, else the server's default)."""
        model_id = model_id or self.model or self.models()["default"]
        return self._call(_get(f"/v1/models/{quote(model_id, safe='')}"))

    def codebook(self, model_id: str | None = None) -> np.ndarray:
        """The model's codebook, float32 [K, d]."""
        model_id = model_id or self.model or self.models()["default"]
        return self._call(_get(f"/v1/models/{quote(model_id, safe='')}/codebook", _parse_npy, format="npy"))

    def health(self) -> bool:
        """Whether the server is ready (GET /health/ready answers 200); never retries or raises."""
        try:
            return self._http.get("/health/ready").status_code == 200
        except httpx.TransportError:
            return False

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> TokenizerClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncTokenizerClient:
    """Asynchronous client with the same API; use `async with` or await close()."""

    # Arguments as for TokenizerClient; transport must be an async one (httpx.MockTransport is both).
    def __init__(self, base_url: str = "http://127.0.0.1:8000", *, api_key: str | None = None,
                 model: str | None = None, timeout: float = 60.0, retries: int = 5, backoff: float = 0.2,
                 max_backoff: float = 5.0, transport: httpx.AsyncBaseTransport | None = None):
        self.model = model
        self.policy = RetryPolicy(retries, backoff, max_backoff)
        self._http = httpx.AsyncClient(**_client_kwargs(base_url, api_key, timeout, transport))

    async def _call(self, call: _Call):
        attempt = 0
        while True:
            response = error = None
            try:
                response = await self._http.request(call.method, call.path, **call.send_kwargs())
            except httpx.TransportError as e:
                error = e
            delay = self.policy.delay(attempt, response, error)
            if delay is None:
                return _outcome(call, response, error)
            await _async_sleep(delay)
            attempt += 1

    async def tokenize(self, images, *, resize: str = "pad", model: str | None = None) -> np.ndarray:
        """Images (one or a list) -> token ids [batch, t, h, w]; see TokenizerClient.tokenize."""
        return await self._call(_tokenize_call(images, resize, model or self.model, npy=True))

    async def tokenize_json(self, images, *, resize: str = "pad", model: str | None = None) -> dict:
        return await self._call(_tokenize_call(images, resize, model or self.model, npy=False))

    async def detokenize(self, tokens, *, image_size=None, model: str | None = None) -> list[Image.Image]:
        """Token grids -> RGB PIL images; see TokenizerClient.detokenize."""
        return await self._call(_detokenize_call(tokens, image_size, model or self.model))

    async def compress(self, image, *, prior: str | None = None, model: str | None = None) -> bytes:
        return await self._call(_compress_call(image, prior, model or self.model))

    async def decompress(self, data: bytes) -> Image.Image:
        return await self._call(_decompress_call(data))

    async def info(self) -> dict:
        return await self._call(_get("/info"))

    async def models(self) -> dict:
        return await self._call(_get("/v1/models"))

    async def model_info(self, model_id: str | None = None) -> dict:
        model_id = model_id or self.model or (await self.models())["default"]
        return await self._call(_get(f"/v1/models/{quote(model_id, safe='')}"))

    async def codebook(self, model_id: str | None = None) -> np.ndarray:
        model_id = model_id or self.model or (await self.models())["default"]
        return await self._call(_get(f"/v1/models/{quote(model_id, safe='')}/codebook", _parse_npy, format="npy"))

    async def health(self) -> bool:
        try:
            return (await self._http.get("/health/ready")).status_code == 200
        except httpx.TransportError:
            return False

    async def close(self) -> None:
        await self._http.aclose()

    aclose = close

    async def __aenter__(self) -> AsyncTokenizerClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
