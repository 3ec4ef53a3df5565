"""Closed-loop load on a real `gqtok serve`: throughput and latency of tokenize and detokenize.

    python benchmarks/service.py [--model DIR] [--concurrency 1 16] [--seconds 10] [--quick]

Starts the server (uvicorn, loopback) on the model (default: models/default),
then for each concurrency runs that many clients that each send one request,
wait for the answer, and send the next: single 256x256 PNG photos to
/v1/tokenize, single token grids (npy) to /v1/detokenize. Reports images/s and
p50/p95/p99 latency per case, and writes benchmarks/results/service.json.
The load generator runs on the same machine and takes CPU from the server:
the figures are what one box does, client included.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"
NPY = "application/x-npy"


def test_images(n: int, size: int = 256) -> list[bytes]:
    """Real held-out photos when the photo set is there, else smooth synthetic images."""
    from training.data import DEFAULT_DATA_DIR, HELDOUT

    pngs = []
    folder = REPO / DEFAULT_DATA_DIR
    for i in range(n):
        path = folder / f"{HELDOUT[i % len(HELDOUT)]}.jpg"
        if path.exists():
            with Image.open(path) as im:
                w, h = im.size
                img = im.convert("RGB").crop(((w - size) // 2, (h - size) // 2, (w + size) // 2, (h + size) // 2))
        else:
            yy, xx = np.mgrid[0:size, 0:size] / size
            img = Image.fromarray((np.stack([xx, yy, (xx + yy) / 2 + 0.1 * i], -1) % 1 * 255).astype(np.uint8))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        pngs.append(buf.getvalue())
    return pngs


def start_server(model: Path, extra: list[str]) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "gqtok.cli", "serve", "--model", str(model), "--port", str(port),
                             "--log-level", "warning", *extra], cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/health/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not become ready")


async def closed_loop(url: str, route: str, bodies: list[bytes], headers: dict, concurrency: int, seconds: float) -> dict:
    latencies, errors = [], 0
    stop = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:
        async def worker(k: int):
            nonlocal errors
            i = k
            while time.perf_counter() < stop:
                t = time.perf_counter()
                r = await client.post(route, content=bodies[i % len(bodies)], headers=headers)
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - t)
                else:
                    errors += 1
                i += concurrency

        start = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        wall = time.perf_counter() - start
    lat = np.array(latencies) * 1e3
    return {"concurrency": concurrency, "requests": len(latencies), "errors": errors,
            "images_per_s": round(len(latencies) / wall, 2),
            **{f"p{q}_ms": round(float(np.percentile(lat, q)), 1) if len(lat) else None for q in (50, 95, 99)}}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(REPO / "models" / "default"), help="model directory")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--seconds", type=float, default=10.0, help="per case")
    ap.add_argument("--quick", action="store_true", help="3 s per case (< 60 s in all)")
    ap.add_argument("--server-args", default="", help="extra `gqtok serve` flags, quoted")
    ap.add_argument("--out", default=str(RESULTS / "service.json"))
    args = ap.parse_args(argv)
    seconds = 3.0 if args.quick else args.seconds

    pngs = test_images(16)
    proc, url = start_server(Path(args.model), args.server_args.split())
    try:
        grids = []
        for p in pngs:
            r = httpx.post(f"{url}/v1/tokenize", content=p, headers={"content-type": "image/png", "accept": NPY})
            r.raise_for_status()
            grids.append(r.content)  # one npy grid (1, t, h, w) per image
        info = httpx.get(f"{url}/info").json()
        rows = []
        for c in args.concurrency:
            for route, bodies, ct in (("/v1/tokenize", pngs, "image/png"), ("/v1/detokenize", grids, NPY)):
                row = asyncio.run(closed_loop(url, route, bodies, {"content-type": ct, "accept": NPY}, c, seconds))
                rows.append({"route": route, **row})
                print(f"{route:<16} c={c:<3} {row['images_per_s']:>8.2f} img/s  p50 {row['p50_ms']} ms  "
                      f"p95 {row['p95_ms']} ms  p99 {row['p99_ms']} ms  errors {row['errors']}", flush=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    result = {"benchmark": "service", "model": args.model, "seconds_per_case": seconds, "image_size": [256, 256],
              "server": info, "cpu_count": os.cpu_count(), "python": platform.python_version(), "results": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2).replace(str(REPO) + os.sep, "") + "\n")  # repo-relative
    return result


if __name__ == "__main__":
    main()
