"""Python client of the gqtok tokenizer service (HTTP API v1), sync and async.

    with TokenizerClient("http://127.0.0.1:8000") as tok:
        ids = tok.tokenize(["a.jpg", "b.jpg"])        # uint16 [batch, t, h, w]
        images = tok.detokenize(ids)                   # list of PIL images
        data = tok.compress("a.jpg")                   # bytes: tokens entropy-coded
        image = tok.decompress(data)                   # PIL image at the original size

Needs httpx, numpy and Pillow only (no torch). How requests are built and answers read lives in
client_protocol.py, shared by both classes; the classes only send and sleep.
"""

from __future__ import annotations

import asyncio
import time
from urllib.parse import quote

import httpx
import numpy as np
from PIL import Image

from gqtok.service.client_protocol import (RetryPolicy, TokenizerError, _as_list, _Call, _client_kwargs, _compress_call,
                                           _decompress_call, _detokenize_call, _grid_chunks,
                                           _check_output, _grid_list, _images_out, _get, _many_results, _outcome,
                                           _parse_npy, _tokenize_call)

__all__ = ["TokenizerClient", "AsyncTokenizerClient", "TokenizerError", "RetryPolicy"]

# Patched by the tests to record waits instead of sleeping.
_sleep = time.sleep
_async_sleep = asyncio.sleep


# -- the clients -------------------------------------------------------------------------------------------------
class TokenizerClient:
    """Synchronous client; use as a context manager or call close()."""

    # base_url: the service root. api_key: sent as "Authorization: Bearer KEY" (None: no header).
    # model: model id for every request (None: the server's default). timeout: seconds per HTTP attempt.
    # retries / backoff / max_backoff: on 429, 503, connection errors and a proxy's 500/502 retry up to `retries` times,
    # waiting backoff * 2**attempt seconds capped at max_backoff (or Retry-After when longer), plus jitter; a 503
    # timeout only with retry_timeouts=True (the server may still be working on the first attempt).
    # transport: an httpx transport, e.g. httpx.MockTransport in tests (None: real network).
    def __init__(self, base_url: str = "http://127.0.0.1:8000", *, api_key: str | None = None,
                 model: str | None = None, timeout: float = 60.0, retries: int = 5, backoff: float = 0.2,
                 max_backoff: float = 5.0, retry_timeouts: bool = False, transport: httpx.BaseTransport | None = None):
        self.model = model
        self.policy = RetryPolicy(retries, backoff, max_backoff, retry_timeouts=retry_timeouts)
        self._limit: int | None = None  # the server's max_images_per_request
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

    def tokenize(self, images, *, fit: str = "pad", model: str | None = None,
                 max_tokens: int | None = None) -> np.ndarray:
        """Images (one or a list) -> token ids [batch, t, h, w] (uint16 when K <= 65536, else int32).
        All images must give the same grid size; for mixed sizes use tokenize_json. max_tokens: a token budget,
        each image resized by the server (aspect kept) to fit it; tokenize_json says to what size."""
        return self._call(_tokenize_call(images, fit, model or self.model, npy=True, max_tokens=max_tokens))

    def tokenize_many(self, images, *, fit: str = "pad", model: str | None = None) -> list:
        """Any number of images of any sizes -> one result per image, in order: its token ids, int64 [t, h, w],
        or the TokenizerError that this image alone met. Sent in requests
        of at most the server's max_images_per_request (read once from /info); a request-level error (server
        down, queue full after the retries) still raises."""
        limit = self._images_per_request()
        results: list = []
        items = _as_list(images)
        for start in range(0, len(items), limit):
            results += _many_results(self.tokenize_json(items[start:start + limit], fit=fit, model=model))
        return results

    def _images_per_request(self) -> int:
        if self._limit is None:
            self._limit = int(self.info()["limits"]["max_images_per_request"])
        return self._limit

    def tokenize_json(self, images, *, fit: str = "pad", model: str | None = None,
                      max_tokens: int | None = None) -> dict:
        """Images -> the server's JSON answer: {"model", "results": [{"tokens", "grid_size", "original_size",
        "resized_size", ...}]}."""
        return self._call(_tokenize_call(images, fit, model or self.model, npy=False, max_tokens=max_tokens))

    def detokenize(self, tokens, *, image_size=None, output: str = "pil", model: str | None = None,
                   model_digest: str | None = None, output_size=None):
        """Token grids ([batch, t, h, w], [t, h, w], [h, w], a list of grids of any sizes, numpy arrays, torch
        tensors or nested lists) -> images, cropped by the server to image_size (H, W) when given. output: "pil"
        (list of RGB PIL images), "numpy" (uint8 [batch, H, W, 3]) or "torch" (float32 [batch, 3, H, W] in [0, 1]);
        grids of several sizes go one request per size and come back as a list, in order. Batches longer than
        the server's max_images_per_request (read once from /info) are split. model_digest (the model_digest of
        the model that made the tokens, from model_info()): refused with 409 unless the server's model is that
        export. output_size (H, W): the server resizes the (cropped) images to it: under a token budget, pass
        tokenize's resized_size as image_size and its original_size here to get the picture back at its size."""
        _check_output(output)
        grids = _grid_list(tokens)
        chunks = _grid_chunks(tokens, grids, self._images_per_request() if grids else 1)
        answers = [self._call(_detokenize_call(grids, image_size, model or self.model, model_digest, output_size))
                   for _, grids in chunks]
        return _images_out(chunks, answers, output)

    def compress(self, image, *, prior: str | None = None, model: str | None = None,
                 quality: int | None = None) -> bytes:
        """One image -> the compressed bitstream. A tokenizer: prior uniform, frequency, context or pc (default
        the strongest). A codec model (model="codec"): quality 1 (fewest bits) .. its qualities (default its middle)."""
        return self._call(_compress_call(image, prior, model or self.model, quality))

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
                 max_backoff: float = 5.0, retry_timeouts: bool = False,
                 transport: httpx.AsyncBaseTransport | None = None):
        self.model = model
        self.policy = RetryPolicy(retries, backoff, max_backoff, retry_timeouts=retry_timeouts)
        self._limit: int | None = None
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

    async def tokenize(self, images, *, fit: str = "pad", model: str | None = None,
                       max_tokens: int | None = None) -> np.ndarray:
        """Images (one or a list) -> token ids [batch, t, h, w]; see TokenizerClient.tokenize."""
        return await self._call(_tokenize_call(images, fit, model or self.model, npy=True, max_tokens=max_tokens))

    async def tokenize_many(self, images, *, fit: str = "pad", model: str | None = None) -> list:
        """Per image its token ids or its TokenizerError; see TokenizerClient.tokenize_many. The chunks go
        concurrently."""
        if self._limit is None:
            self._limit = int((await self.info())["limits"]["max_images_per_request"])
        items = _as_list(images)
        answers = await asyncio.gather(*(self.tokenize_json(items[i:i + self._limit], fit=fit, model=model)
                                         for i in range(0, len(items), self._limit)))
        return [r for a in answers for r in _many_results(a)]

    async def tokenize_json(self, images, *, fit: str = "pad", model: str | None = None,
                            max_tokens: int | None = None) -> dict:
        return await self._call(_tokenize_call(images, fit, model or self.model, npy=False, max_tokens=max_tokens))

    async def detokenize(self, tokens, *, image_size=None, output: str = "pil", model: str | None = None,
                         model_digest: str | None = None, output_size=None):
        """Token grids -> images; see TokenizerClient.detokenize. The requests go concurrently."""
        _check_output(output)
        grids = _grid_list(tokens)
        if self._limit is None and grids:
            self._limit = int((await self.info())["limits"]["max_images_per_request"])
        chunks = _grid_chunks(tokens, grids, self._limit or 1)
        answers = await asyncio.gather(*(self._call(_detokenize_call(grids, image_size, model or self.model,
                                                                     model_digest, output_size))
                                         for _, grids in chunks))
        return _images_out(chunks, list(answers), output)

    async def compress(self, image, *, prior: str | None = None, model: str | None = None,
                       quality: int | None = None) -> bytes:
        return await self._call(_compress_call(image, prior, model or self.model, quality))

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
