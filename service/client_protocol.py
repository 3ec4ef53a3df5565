"""The client's side of the HTTP API: building requests, reading answers, the retry policy.

Plain functions and data, shared by the sync and async clients of gqtok.service.client, which only send and
sleep. Needs httpx, numpy and Pillow only (no torch).
"""

from __future__ import annotations

import email.utils
import io
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from gqtok.photos import as_uint8_array, to_torch

NPY = "application/x-npy"
COMPRESSED = "application/x-gqtok"
FIT_MODES = ("pad", "crop", "exact")

# 429 (queue full, too many requests) and 503 (warming up, draining, failing) are the server asking us to come
# back later, usually with Retry-After; every other error is an answer about this request and is final. A 503
# `timeout` is final by default: the server was too busy for this request, and sending it again adds work that
# the server cannot cancel (RetryPolicy(retry_timeouts=True) retries it anyway).
RETRY_STATUSES = frozenset({429, 503})
# A 500 or 502 that is not the service's own JSON error comes from something between us and it: a load balancer
# whose replica died or answered nothing (HAProxy in docker-compose.yml: 502), Ray Serve's proxy whose replica
# died mid-request (500). Every call of the client is a pure function of its input, so sending it again is safe.
# The service's own 500 (error_type "internal") is final, and so is a 504: the server may still be working.
GATEWAY_STATUSES = frozenset({500, 502})
# Failures to reach the server or to get an answer at all (connection refused or reset, a keep-alive
# connection closed under us). Read timeouts are not retried: the server may still be working on it.
RETRY_ERRORS = (httpx.NetworkError, httpx.RemoteProtocolError, httpx.ConnectTimeout)

# PIL.Image.Image | np.ndarray or torch tensor (uint8 0-255 or float 0-1; HxWx3, HxW or 3xHxW) | bytes (an encoded
# file) | str | Path (a file)
ImageLike = Any


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


def _as_png(data: bytes) -> bytes | None:
    """A file of a format the server does not take, as PNG: its first frame, EXIF orientation applied (as the
    server applies it to the formats it takes); None if Pillow cannot read it."""
    from PIL import ImageOps

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.seek(0)
            return _png(ImageOps.exif_transpose(im))
    except Exception:  # not an image Pillow reads, or a broken one
        return None


def _png(img: Image.Image) -> bytes:
    if img.mode not in ("RGB", "RGBA", "L", "LA", "P", "1"):  # modes PNG cannot hold (CMYK, F, ...)
        img = img.convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)  # lossless; level 1 is fast and the upload is local
    return buf.getvalue()


def image_file(image: ImageLike) -> tuple[bytes, str]:
    """One image -> (encoded bytes, media type). Arrays and PIL images become PNG (lossless);
    bytes and files go as they are (the server judges formats it does not accept)."""
    if isinstance(image, (str, Path)):
        image = Path(image).read_bytes()
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        kind = _sniff(data)
        if kind is not None:
            return data, kind
        converted = _as_png(data)  # BMP, GIF, TIFF, ...: what Pillow reads goes as PNG
        # what Pillow cannot read is still sent: the server's answer says what is wrong with it
        return (converted, "image/png") if converted is not None else (data, "image/png")
    if isinstance(image, Image.Image):
        return _png(image), "image/png"
    if isinstance(image, np.ndarray) or type(image).__module__.startswith("torch"):
        return _png(Image.fromarray(as_uint8_array(image))), "image/png"  # alpha kept: the server composites it
    raise TypeError(f"cannot send {type(image).__name__} as an image; "
                    "use a PIL image, a uint8 array, encoded bytes or a file path")


def _as_list(images) -> list:
    """One image or several -> a list (a 4-D array or tensor is a batch)."""
    if isinstance(images, (list, tuple)):
        out = list(images)
    elif getattr(images, "ndim", 0) == 4 and not isinstance(images, (bytes, str)):
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


def _tokenize_call(images, fit: str, model: str | None, npy: bool, max_tokens: int | None = None) -> _Call:
    """One image -> a raw body; several -> multipart with repeated 'image' parts. max_tokens: the token budget."""
    if fit not in FIT_MODES:
        raise ValueError(f"fit must be one of {', '.join(FIT_MODES)}, got {fit!r}")
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    encoded = [image_file(x) for x in _as_list(images)]
    headers = {"accept": NPY} if npy else {"accept": "application/json"}
    parse = _parse_npy if npy else _parse_json
    params = _model_params(model, fit=fit, max_tokens=max_tokens)
    if len(encoded) == 1:
        data, kind = encoded[0]
        return _Call("POST", "/v1/tokenize", parse, params, {**headers, "content-type": kind}, content=data)
    ext = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}
    files = [("image", (f"image{i}.{ext.get(kind, 'bin')}", data, kind)) for i, (data, kind) in enumerate(encoded)]
    return _Call("POST", "/v1/tokenize", parse, params, headers, files=files)


def _size_param(name: str, size) -> str | None:
    """(H, W) -> "H,W" for the query, None stays None."""
    if size is None:
        return None
    if len(size) != 2 or any(int(v) < 1 for v in size):
        raise ValueError(f"{name} must be (H, W), two positive integers; got {size!r}")
    return f"{int(size[0])},{int(size[1])}"


def _detokenize_call(tokens, image_size, model: str | None, model_digest: str | None = None,
                     output_size=None) -> _Call:
    """Token grids -> a .npy body; asks for npy back. image_size: crop to (H, W); output_size: then resize to (H, W)
    (a token budget's original size). model_digest: the tokens' maker (tokenize's model_digest); the server
    refuses them (409) if it differs."""
    arr = np.asarray(tokens)
    if arr.dtype == bool or arr.dtype.kind not in "iu":
        raise TypeError(f"tokens must be integer token ids (got dtype {arr.dtype})")
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    params = _model_params(model, model_digest=model_digest, image_size=_size_param("image_size", image_size),
                           output_size=_size_param("output_size", output_size))
    return _Call("POST", "/v1/detokenize", _parse_images, params, {"accept": NPY, "content-type": NPY},
                 content=buf.getvalue())


def _compress_call(image, prior: str | None, model: str | None, quality: int | None = None) -> _Call:
    data, kind = image_file(image)
    return _Call("POST", "/v1/compress", lambda r: r.content, _model_params(model, prior=prior, quality=quality),
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


def _parse_images(response: httpx.Response) -> np.ndarray:
    arr = _parse_npy(response)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise TokenizerError(f"expected uint8 images [batch, H, W, 3], got {arr.dtype} {list(arr.shape)}",
                             status=response.status_code, error_type="bad_response")
    return arr


# What detokenize returns: "pil" a list of RGB PIL images; "numpy" uint8 [batch, H, W, 3]; "torch" float32
# [batch, 3, H, W] in [0, 1] (as torch models take images). Grids of several sizes give a list of [H, W, 3]
# arrays or [3, H, W] tensors instead of one batch.
IMAGE_OUTPUTS = ("pil", "numpy", "torch")


def _check_output(output: str) -> None:
    if output not in IMAGE_OUTPUTS:
        raise ValueError(f"output must be one of {', '.join(IMAGE_OUTPUTS)}, got {output!r}")


def _grid_list(tokens) -> list[np.ndarray] | None:
    """Several token grids as a list of [t, h, w] arrays; None for one grid. A list of arrays or tensors is a list
    of grids; nested Python lists are one array ([batch, t, h, w], [t, h, w] or [h, w]) unless ragged."""
    if isinstance(tokens, (list, tuple)) and tokens and not isinstance(tokens[0], (list, tuple, int, np.integer)):
        grids = [np.asarray(g) for g in tokens]  # numpy arrays, torch tensors
    else:
        try:
            arr = np.asarray(tokens)
        except ValueError:  # ragged nested lists: grids of several sizes
            grids = [np.asarray(g) for g in tokens]
        else:
            return list(arr) if arr.ndim == 4 and len(arr) > 1 else None
    grids = [g[None] if g.ndim == 2 else g for g in grids]  # [h, w] -> [1, h, w]
    return grids if len(grids) > 1 else None


def _grid_chunks(tokens, grids: list[np.ndarray] | None, limit: int) -> list[tuple[list[int] | None, object]]:
    """Token grids (`grids`: _grid_list(tokens)) -> (their positions, a batch of one size) per request, each at most
    `limit` grids. One grid goes as it is (positions None)."""
    if grids is None:
        return [(None, tokens)]
    by_shape: dict[tuple, list[int]] = {}
    for i, g in enumerate(grids):
        by_shape.setdefault(g.shape, []).append(i)
    return [(idx[i:i + limit], np.stack([grids[j] for j in idx[i:i + limit]]))
            for idx in by_shape.values() for i in range(0, len(idx), limit)]


def _images_out(chunks: list, answers: list[np.ndarray], output: str):
    """The answers of _grid_chunks' requests, in the grids' order, as `output` asks."""
    if len(answers) == 1 and chunks[0][0] is None:
        images, one_size = answers[0], True
    else:
        slots: list = [None] * sum(len(idx) for idx, _ in chunks)
        for (idx, _), answer in zip(chunks, answers):
            for j, image in zip(idx, answer):
                slots[j] = image
        one_size = len({im.shape for im in slots}) == 1
        images = np.stack(slots) if one_size else slots
    if output == "pil":
        return [Image.fromarray(a) for a in images]
    if output == "numpy":
        return images
    return to_torch(images) if one_size else [to_torch(a) for a in images]


def _parse_image(response: httpx.Response) -> Image.Image:
    arr = _parse_npy(response)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3:
        raise TokenizerError(f"expected a uint8 image [H, W, 3], got {arr.dtype} {list(arr.shape)}",
                             status=response.status_code, error_type="bad_response")
    return Image.fromarray(arr)


def _many_results(answer: dict) -> list:
    """A JSON tokenize answer -> per image: int64 token ids [t, h, w], or the TokenizerError it met alone."""
    out = []
    for r in answer["results"]:
        if r.get("status", 200) != 200:
            out.append(TokenizerError(r["error"], status=r["status"], error_type=r["error_type"]))
            continue
        out.append(np.asarray(r["tokens"], dtype=np.int64).reshape(r["tokens_per_position"], *r["grid_size"]))
    return out


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
    retry_timeouts: bool = False  # also retry a 503 timeout (the server ran out of time for this request)

    def delay(self, attempt: int, response: httpx.Response | None, error: Exception | None) -> float | None:
        """Seconds to wait before retrying after `attempt` (0-based), or None when this outcome is final."""
        if attempt >= self.retries:
            return None
        if error is not None:
            if not isinstance(error, RETRY_ERRORS):
                return None
            asked = 0.0
        elif response.status_code in RETRY_STATUSES:
            if not self.retry_timeouts and _error_type(response) == "timeout":
                return None
            asked = min(_retry_after(response.headers.get("retry-after")) or 0.0, self.max_retry_after)
        elif response.status_code in GATEWAY_STATUSES and _error_type(response) is None:
            asked = 0.0
        else:
            return None
        wait = max(min(self.backoff * 2**attempt, self.max_backoff), asked)
        return wait + random.uniform(0, 0.1 * wait + 0.01)  # jitter: concurrent clients do not return in step


def _error_type(response: httpx.Response) -> str | None:
    try:
        return response.json().get("error_type")
    except Exception:
        return None


def _client_kwargs(base_url: str, api_key: str | None, timeout: float, transport) -> dict:
    headers = {"user-agent": "gqtok-client"}
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    kw = {"base_url": base_url, "headers": headers, "timeout": timeout}
    if transport is not None:
        kw["transport"] = transport
    return kw


