"""A small real client of the tokenizer service, for smoke tests of a deployment.

    python -m gqtok.service.demo_client --url http://127.0.0.1:8000 --once
    python -m gqtok.service.demo_client --url http://tokenizer:8000 --interval 10 --image photo.jpg

Each round it waits until GET /health/ready answers 200, sends one image to
POST /v1/tokenize (raw PNG body), sends the token grid back to
POST /v1/detokenize, and prints one line: the model, the grid, token
statistics (distinct ids, codebook usage, bits per token, bits per pixel), the
reconstruction's PSNR against the image sent, and the server's timings.

The image is --image (a photo, centre-cropped to --size) or, without it, a
generated one (smooth colour gradients and soft discs, the same every run).
With --once it exits 0 after one good round and 1 otherwise; without it, it
repeats every --interval seconds, survives tokenizer restarts (it waits for
ready again), and exits 0 on SIGTERM or SIGINT. Needs numpy, pillow and httpx
(the `serve` extra); no torch.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image


def generated_image(size: int = 256, seed: int = 0) -> np.ndarray:
    """uint8 [size, size, 3]: smooth gradients plus a few soft discs (deterministic for a seed)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    img = np.stack([0.15 + 0.7 * x, 0.2 + 0.6 * y, 0.8 - 0.5 * (x + y) / 2], axis=-1)
    for _ in range(6):
        cy, cx = rng.uniform(0.1, 0.9, 2)
        r = rng.uniform(0.06, 0.22)
        colour = rng.uniform(0.0, 1.0, 3).astype(np.float32)
        d = np.sqrt((y - cy) ** 2 + (x - cx) ** 2)
        alpha = np.clip((r - d) / 0.02, 0.0, 1.0)[..., None] * 0.8
        img = img * (1 - alpha) + colour * alpha
    return np.clip(np.round(img * 255), 0, 255).astype(np.uint8)


def load_image(path: Path, size: int) -> np.ndarray:
    """An RGB photo as uint8 [H, W, 3], centre-cropped to at most size x size (size 0: whole image)."""
    with Image.open(path) as im:
        img = np.asarray(im.convert("RGB"))
    if size > 0:
        h, w = img.shape[:2]
        top, left = max(0, (h - size) // 2), max(0, (w - size) // 2)
        img = img[top: top + size, left: left + size]
    return np.ascontiguousarray(img)


def png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


class DemoError(RuntimeError):
    pass


def _check(resp: httpx.Response, what: str) -> httpx.Response:
    if resp.status_code != 200:
        raise DemoError(f"{what}: HTTP {resp.status_code}: {resp.text[:300]}")
    return resp


def wait_ready(client: httpx.Client, timeout_s: float, stop: threading.Event) -> None:
    """Poll GET /health/ready until it answers 200; DemoError after timeout_s."""
    deadline, last = time.monotonic() + timeout_s, "no answer yet"
    while not stop.is_set():
        try:
            resp = client.get("/health/ready", timeout=5.0)
            if resp.status_code == 200:
                return
            last = f"HTTP {resp.status_code} {resp.text[:200]}"
        except httpx.HTTPError as e:
            last = f"{type(e).__name__}: {e}"
        if time.monotonic() >= deadline:
            raise DemoError(f"{client.base_url} not ready after {timeout_s:g} s ({last})")
        stop.wait(0.5)
    raise DemoError("stopped while waiting for the tokenizer")


def one_round(client: httpx.Client, img: np.ndarray, model: str | None) -> dict:
    """Tokenize img, detokenize the grid, measure. Returns the round's figures."""
    params = {"model": model} if model else {}
    t0 = time.perf_counter()
    resp = _check(client.post("/v1/tokenize", content=png_bytes(img), params=params,
                              headers={"content-type": "image/png"}), "tokenize")
    t1 = time.perf_counter()
    body = resp.json()
    result = body["results"][0]
    tokens = np.asarray(result["tokens"], dtype=np.int64)
    meta = _check(client.get(f"/v1/models/{body['model']}"), "model metadata").json()

    payload = {"tokens": result["tokens"], "image_size": result["original_size"], "model": body["model"]}
    t2 = time.perf_counter()
    back = _check(client.post("/v1/detokenize", json=payload), "detokenize")
    t3 = time.perf_counter()
    with Image.open(io.BytesIO(back.content)) as im:
        recon = np.asarray(im.convert("RGB"))
    if recon.shape != img.shape:
        raise DemoError(f"detokenize returned {recon.shape}, expected {img.shape}")

    k = int(meta["num_codes"])
    if tokens.size == 0 or tokens.min() < 0 or tokens.max() >= k:
        raise DemoError(f"token ids outside [0, {k})")
    counts = np.bincount(tokens.ravel(), minlength=k)
    p = counts[counts > 0] / tokens.size
    bits = float(meta["bits_per_token"])
    h, w = img.shape[:2]
    return {
        "model": body["model"],
        "image_size": [h, w],
        "grid": list(tokens.shape),
        "tokens": int(tokens.size),
        "distinct_tokens": int(np.count_nonzero(counts)),
        "codebook_size": k,
        "codebook_usage": round(float(np.count_nonzero(counts)) / k, 4),
        "token_entropy_bits": round(float(-(p * np.log2(p)).sum()), 3),
        "bits_per_token": bits,
        "bpp": round(tokens.size * bits / (h * w), 4),
        "psnr_db": round(psnr(img, recon), 2),
        "tokenize_ms": round(1e3 * (t1 - t0), 1),
        "detokenize_ms": round(1e3 * (t3 - t2), 1),
        "server_inference_ms": [float(resp.headers.get("x-inference-time", "nan")),
                                float(back.headers.get("x-inference-time", "nan"))],
    }


def format_line(r: dict) -> str:
    return (f"model={r['model']} image={r['image_size'][0]}x{r['image_size'][1]} grid={'x'.join(map(str, r['grid']))} "
            f"tokens={r['tokens']} distinct={r['distinct_tokens']}/{r['codebook_size']} "
            f"entropy={r['token_entropy_bits']:.2f}b bits/token={r['bits_per_token']:g} bpp={r['bpp']:g} "
            f"psnr={r['psnr_db']:.2f}dB tokenize={r['tokenize_ms']:.1f}ms detokenize={r['detokenize_ms']:.1f}ms")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m gqtok.service.demo_client",
                                 description="Tokenize and detokenize one image against a gqtok service, "
                                             "print PSNR and token statistics; repeat.")
    ap.add_argument("--url", default=os.environ.get("GQTOK_URL", "http://127.0.0.1:8000"),
                    help="service base URL (default $GQTOK_URL or http://127.0.0.1:8000)")
    ap.add_argument("--api-key", default=os.environ.get("GQTOK_API_KEY") or None,
                    help="bearer key when the service has one (default $GQTOK_API_KEY)")
    ap.add_argument("--model", help="model id (default: the service's default model)")
    ap.add_argument("--image", type=Path, help="image file to send (default: a generated image)")
    ap.add_argument("--size", type=int, default=256,
                    help="generated image side, or the centre crop of --image (0: the whole image); default 256")
    ap.add_argument("--once", action="store_true", help="one round, then exit 0 on success, 1 on failure")
    ap.add_argument("--interval", type=float, default=10.0, help="seconds between rounds (default 10)")
    ap.add_argument("--wait-timeout", type=float, default=120.0,
                    help="how long to wait for /health/ready (default 120 s)")
    ap.add_argument("--json", action="store_true", help="print each round as one JSON object")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.image is not None:
        img = load_image(args.image, args.size)
    else:
        img = generated_image(args.size if args.size > 0 else 256)
    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}

    stop = threading.Event()
    if not args.once:  # as PID 1 in a container SIGTERM is ignored unless handled
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())

    rounds = 0
    while not stop.is_set():
        try:
            # A new client per round: a new connection, so compose's DNS round-robin
            # spreads rounds over scaled tokenizer replicas.
            with httpx.Client(base_url=args.url, headers=headers, timeout=60.0) as client:
                wait_ready(client, args.wait_timeout, stop)
                result = one_round(client, img, args.model)
            rounds += 1
            print(json.dumps(result) if args.json else format_line(result), flush=True)
            if args.once:
                return 0
        except (DemoError, httpx.HTTPError, KeyError, ValueError) as e:
            if stop.is_set():  # asked to stop while waiting: not a failure
                break
            print(f"demo_client: error: {e}", file=sys.stderr, flush=True)
            if args.once:
                return 1
        stop.wait(args.interval)
    print(f"demo_client: stopped after {rounds} round(s)", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
