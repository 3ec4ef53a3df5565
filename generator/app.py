"""The generator service: sample token grids, decode them through the tokenizer service, answer a PNG grid.

    gqtok generator serve runs/generator --tokenizer-url http://tokenizer:8000 --port 8001

Routes: POST /generate (JSON {n, seed, temperature, top_k, top_p} -> image/png, a grid of n samples),
GET /health/live, GET /health/ready (the generator is loaded and the tokenizer answers ready),
GET /info (the generator's config, validation bits per token, tokenizer). Errors are JSON
{"error", "error_type"} as in the tokenizer service. Sampling runs one request at a time in a
worker thread; the tokenizer is reached only through the Python client (service/client.py).
"""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from gqtok.service import errors

MAX_SAMPLES = 16  # per request: sampling is sequential in the token count and holds the worker


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n: int = Field(4, ge=1, le=MAX_SAMPLES)  # images in the grid
    seed: int = Field(0, ge=0, lt=2**63)  # the same seed and options give the same images
    temperature: float = Field(1.0, ge=0.0, le=5.0)  # 0: greedy
    top_k: int | None = Field(None, ge=1)  # keep the k likeliest ids at each step
    top_p: float | None = Field(None, gt=0.0, le=1.0)  # nucleus: the smallest set reaching probability p


class TokenizerUnavailable(errors.ServiceError):
    status, error_type = 503, "tokenizer_unavailable"


def create_app(run_dir: Path, tokenizer_url: str, api_key: str | None = None) -> FastAPI:
    from gqtok.generator.sample import grid_png, sample_grids
    from gqtok.generator.train import load_generator
    from gqtok.service.client import AsyncTokenizerClient, TokenizerError

    state: dict = {}
    lock = asyncio.Lock()  # one sampling at a time: torch already uses every core for one

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        model, summary = await run_in_threadpool(load_generator, Path(run_dir))
        state["model"], state["summary"] = model, summary
        # Decode with the tokenizer model the generator was trained on, whatever the server's default.
        state["client"] = AsyncTokenizerClient(tokenizer_url, api_key=api_key, model=summary["tokenizer"]["tokenizer_model"],
                                               timeout=120, retries=3)
        yield
        await state["client"].close()

    app = FastAPI(title="gqtok generator", lifespan=lifespan,
                  description="Samples of a small autoregressive model over gqtok tokens, decoded by the tokenizer service.")

    errors.install_handlers(app)

    @app.post("/generate", summary="Sample n images -> one PNG grid",
              responses={200: {"content": {"image/png": {}}}})
    async def generate(req: GenerateRequest):
        model = state["model"]
        async with lock:
            t0 = time.perf_counter()
            grids = await run_in_threadpool(sample_grids, model, req.n, req.temperature, req.top_k, req.top_p, req.seed)
            sample_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        try:
            images = await state["client"].detokenize(grids)
        except TokenizerError as e:
            raise TokenizerUnavailable(f"the tokenizer could not decode the samples: {e}") from None
        decode_s = time.perf_counter() - t0
        png = await run_in_threadpool(grid_png, images)
        tokens = req.n * model.cfg.seq_len
        return Response(png, media_type="image/png", headers={
            "x-sample-time": f"{1e3 * sample_s:.1f}", "x-detokenize-time": f"{1e3 * decode_s:.1f}",
            "x-tokens-per-second": f"{tokens / sample_s:.1f}", "x-seed": str(req.seed)})

    @app.get("/health/live")
    async def live():
        return {"live": True}

    @app.get("/health/ready")
    async def ready():
        ok = "model" in state and await state["client"].health()
        return JSONResponse({"ready": ok, "tokenizer": tokenizer_url}, status_code=200 if ok else 503)

    @app.get("/info")
    async def info():
        s = state["summary"]
        return {"generator": s["model"], "val_bits_per_token": s["val_bits_per_token"], "log2_k": s["log2_k"],
                "parameters": s["parameters"], "tokenizer": {"url": tokenizer_url, "model": s["tokenizer"]["tokenizer_model"]},
                "max_samples_per_request": MAX_SAMPLES}

    return app
