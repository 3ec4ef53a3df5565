"""Soak: many mixed requests against a real `gqtok serve`; every answer checked, errors counted by kind, RSS tracked.

    python benchmarks/soak.py [--model DIR] [--requests 10000] [--concurrency 8] [--quick]

The mix (weights in MIX): tokenize as PNG, JPEG, multipart pairs and base64 JSON; detokenize as npy
and JSON; metadata, metrics and health; and bad requests that must be refused (a truncated PNG, a
wrong content type, out-of-range tokens, broken JSON, an unknown model). Every answer is checked:
its status must be the one the request calls for, and tokens and pixels must equal the ones
computed before the soak (nothing lost, nothing mixed up between requests). Small images (32 to 96
pixels a side) keep 10,000 requests to a couple of minutes on a CPU. The server's resident memory
is sampled every `--sample-every` requests; growth is measured from the end of the first tenth
(allocators and caches warmed up) to the end. Writes benchmarks/results/soak.json
(--quick: 1,500 requests, soak_quick.json).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import random
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.service import start_server, test_images  # noqa: E402
from gqtok.service.requests import npy_bytes as npy  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
NPY = "application/x-npy"
SIZES = [(32, 32), (64, 64), (48, 96), (96, 64), (40, 56)]  # the last is not a multiple of 8: padded
MIX = {"tokenize_png": 30, "tokenize_jpeg": 8, "tokenize_multipart": 6, "tokenize_json": 6, "detokenize_npy": 20,
       "detokenize_json": 8, "models": 3, "info": 2, "metrics": 2, "health": 3, "bad_truncated_png": 3,
       "bad_content_type": 3, "bad_token_range": 3, "bad_json": 2, "bad_unknown_model": 1}


def encode(img: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def build_fixtures(url: str, n: int = 10) -> dict:
    """Test images of several sizes and, from the server before the soak, their tokens and decoded pixels."""
    photos = test_images(n, size=96)
    images = [p[:h, :w].copy() for i, p in enumerate(photos) for h, w in [SIZES[i % len(SIZES)]]]
    fx = {"images": images, "png": [encode(x, "PNG") for x in images], "jpeg": [encode(x, "JPEG") for x in images]}
    fx["tokens"] = [load_npy(httpx.post(f"{url}/v1/tokenize", content=p, timeout=60,
                                        headers={"content-type": "image/png", "accept": NPY}).content) for p in fx["png"]]
    fx["tokens_jpeg"] = [load_npy(httpx.post(f"{url}/v1/tokenize", content=p, timeout=60,
                                             headers={"content-type": "image/jpeg", "accept": NPY}).content)
                         for p in fx["jpeg"]]
    fx["pixels"] = [load_npy(httpx.post(f"{url}/v1/detokenize", content=npy(t), timeout=60,
                                        headers={"content-type": NPY, "accept": NPY}).content) for t in fx["tokens"]]
    return fx


async def one_request(client: httpx.AsyncClient, kind: str, i: int, fx: dict, num_codes: int) -> str:
    """Send one request of `kind` built from fixture i; return "ok" or what was wrong with the answer."""
    k = i % len(fx["images"])
    j = (i + 1) % len(fx["images"])
    expect, check = 200, None
    if kind == "tokenize_png":
        r = await client.post("/v1/tokenize", content=fx["png"][k], headers={"content-type": "image/png", "accept": NPY})
        check = lambda r: np.array_equal(load_npy(r.content), fx["tokens"][k])  # noqa: E731
    elif kind == "tokenize_jpeg":
        r = await client.post("/v1/tokenize", content=fx["jpeg"][k], headers={"content-type": "image/jpeg", "accept": NPY})
        check = lambda r: np.array_equal(load_npy(r.content), fx["tokens_jpeg"][k])  # noqa: E731
    elif kind == "tokenize_multipart":
        files = [("image", ("a.png", fx["png"][k], "image/png")), ("image", ("b.png", fx["png"][j], "image/png"))]
        r = await client.post("/v1/tokenize", files=files)
        check = lambda r: [np.array_equal(np.asarray(res["tokens"]).reshape(fx["tokens"][m].shape[1:]),  # noqa: E731
                                          fx["tokens"][m][0]) for res, m in zip(r.json()["results"], (k, j))] == [True] * 2
    elif kind == "tokenize_json":
        body = {"images": [base64.b64encode(fx["png"][k]).decode()]}
        r = await client.post("/v1/tokenize", json=body)
        check = lambda r: np.array_equal(  # noqa: E731
            np.asarray(r.json()["results"][0]["tokens"]).reshape(fx["tokens"][k].shape[1:]), fx["tokens"][k][0])
    elif kind == "detokenize_npy":
        r = await client.post("/v1/detokenize", content=npy(fx["tokens"][k]), headers={"content-type": NPY, "accept": NPY})
        check = lambda r: np.array_equal(load_npy(r.content), fx["pixels"][k])  # noqa: E731
    elif kind == "detokenize_json":
        grid = fx["tokens"][k][0]  # one grid: [T, h, w], or [h, w] when T = 1
        r = await client.post("/v1/detokenize", json={"tokens": (grid[0] if len(grid) == 1 else grid).tolist()})
        check = lambda r: np.array_equal(np.asarray(Image.open(io.BytesIO(r.content))), fx["pixels"][k][0])  # noqa: E731
    elif kind in ("models", "info", "metrics", "health"):
        r = await client.get({"models": "/v1/models", "info": "/info", "metrics": "/metrics", "health": "/health/ready"}[kind])
    elif kind == "bad_truncated_png":
        expect = 422
        r = await client.post("/v1/tokenize", content=fx["png"][k][: len(fx["png"][k]) // 2], headers={"content-type": "image/png"})
    elif kind == "bad_content_type":
        expect = 415
        r = await client.post("/v1/tokenize", content=fx["png"][k], headers={"content-type": "text/plain"})
    elif kind == "bad_token_range":
        expect = 422
        bad = fx["tokens"][k].astype(np.int64)
        bad[0, 0, 0, 0] = num_codes + i
        r = await client.post("/v1/detokenize", content=npy(bad), headers={"content-type": NPY})
    elif kind == "bad_json":
        expect = 400
        r = await client.post("/v1/detokenize", content=b'{"tokens": [[1, 2]', headers={"content-type": "application/json"})
    elif kind == "bad_unknown_model":
        expect = 404
        r = await client.post("/v1/tokenize", params={"model": f"nope-{i}"}, content=fx["png"][k],
                              headers={"content-type": "image/png"})
    else:
        raise ValueError(kind)
    if r.status_code != expect:
        return f"status {r.status_code} (expected {expect})"
    if expect >= 400 and set(r.json()) != {"error", "error_type"}:
        return "error body is not {error, error_type}"
    try:
        if check is not None and not check(r):
            return "wrong content"
    except Exception as e:  # an unreadable answer is a wrong answer
        return f"wrong content ({type(e).__name__})"
    return "ok"


async def soak(url: str, fx: dict, num_codes: int, total: int, concurrency: int, pid: int, sample_every: int) -> dict:
    import psutil

    proc = psutil.Process(pid)
    rng = random.Random(0)
    kinds = rng.choices(list(MIX), weights=list(MIX.values()), k=total)
    outcomes: dict[str, Counter] = {k: Counter() for k in MIX}
    rss = [(0, proc.memory_info().rss)]
    done = 0
    next_index = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:
        async def worker():
            nonlocal done, next_index
            while next_index < total:
                i = next_index
                next_index += 1
                try:
                    result = await one_request(client, kinds[i], i, fx, num_codes)
                except httpx.HTTPError as e:
                    result = f"transport error {type(e).__name__}"
                outcomes[kinds[i]][result] += 1
                done += 1
                if done % sample_every == 0:
                    rss.append((done, proc.memory_info().rss))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    rss.append((done, proc.memory_info().rss))
    mib = [(n, round(b / 2**20, 1)) for n, b in rss]
    warm = next(m for n, m in mib if n >= total // 10)
    counts = np.array([n for n, _ in mib if n >= total // 10], float)
    values = np.array([m for n, m in mib if n >= total // 10], float)
    slope = float(np.polyfit(counts, values, 1)[0] * 1000) if len(counts) > 2 else 0.0
    failures = {k: {r: c for r, c in v.items() if r != "ok"} for k, v in outcomes.items()}
    return {"requests": done, "seconds": round(wall, 1), "requests_per_s": round(done / wall, 1),
            "by_kind": {k: sum(v.values()) for k, v in outcomes.items()},
            "failures": {k: v for k, v in failures.items() if v}, "failed": sum(sum(v.values()) for v in failures.values()),
            "rss_mib_start": mib[0][1], "rss_mib_after_first_tenth": warm, "rss_mib_end": mib[-1][1],
            "rss_growth_mib_after_first_tenth": round(mib[-1][1] - warm, 1),
            "rss_slope_mib_per_1000_requests": round(slope, 3), "rss_samples": mib}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(REPO / "models" / "default"), help="model directory")
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--sample-every", type=int, default=250, help="requests between RSS samples")
    ap.add_argument("--server-args", default="", help="extra `gqtok serve` flags, quoted")
    ap.add_argument("--quick", action="store_true", help="1,500 requests (< 60 s)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/soak[_quick].json)")
    args = ap.parse_args(argv)
    total = 1500 if args.quick else args.requests
    out = Path(args.out or RESULTS / f"soak{'_quick' if args.quick else ''}.json")

    proc, url = start_server(Path(args.model), args.server_args.split())
    try:
        model = httpx.get(f"{url}/v1/models").json()["models"][0]
        fx = build_fixtures(url)
        result = asyncio.run(soak(url, fx, model["num_codes"], total, args.concurrency, proc.pid,
                                  max(1, min(args.sample_every, total // 20))))
    finally:
        proc.send_signal(signal.SIGTERM)
        exit_code = proc.wait(60)
    result = {"benchmark": "soak", "quick": args.quick, "model": str(Path(args.model)), "model_id": model["model_id"],
              "concurrency": args.concurrency, "server_exit_code": exit_code, **result}
    print(f"{result['requests']} requests in {result['seconds']} s ({result['requests_per_s']}/s), "
          f"failed {result['failed']}: {result['failures'] or 'none'}")
    print(f"server RSS {result['rss_mib_start']} MiB at start, {result['rss_mib_after_first_tenth']} after the first "
          f"tenth, {result['rss_mib_end']} at the end (slope {result['rss_slope_mib_per_1000_requests']} MiB per 1000 "
          f"requests); exit code {exit_code}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1).replace(str(REPO) + os.sep, "") + "\n")
    return result


if __name__ == "__main__":
    main()
