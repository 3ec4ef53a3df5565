"""Hostile clients against a memory budget: the server's peak memory stays under it, nothing answers 5xx,
/metrics and /health/live stay fast, and well-formed requests that are admitted complete.

    python benchmarks/hostile.py [--model DIR] [--budget-mb 1740] [--quick]

A real `gqtok serve --max-memory-mb BUDGET` (compose's value by default) on the default model gets, one wave after
another, N concurrent requests of each hostile shape (N = 64; 16 with --quick):
- json_big: JSON tokenize bodies of about 28 MiB (base64 of noise PNGs);
- raw_big: raw PNG bodies of 30 MiB (a noise image and trailing bytes);
- multipart: multipart bodies of 32 noise images of 256x256;
- many_flat: JSON bodies of 32 flat 1024x1024 PNGs (a small upload, a huge decode);
- slow: uploads that send 16 bytes a second;
then a refused flood: the same json_big wave at a server whose budget leaves almost nothing for requests.
Throughout, a well-formed 256x256 tokenize request runs one after another (each must be 200 or 429, and a 200
must carry the photo's tokens), a prober (its own process) times /metrics and /health/live every 50 ms, and
the server's resident memory is sampled every 20 ms (and its peak read from VmHWM at the end). Writes
benchmarks/results/hostile.json (--quick: hostile_quick.json).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import multiprocessing
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.flood import request_bytes, send_raw  # noqa: E402
from benchmarks.service import png_bytes, start_server, test_images, write_result  # noqa: E402
from gqtok.service.memory import status_kib  # noqa: E402

MIB = 2**20


def noise_png(side: int, seed: int = 0) -> bytes:
    return png_bytes(np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8))


def flat_png(side: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (90, 120, 150)).save(buf, format="PNG")
    return buf.getvalue()


def multipart(files: list[bytes]) -> tuple[bytes, str]:
    boundary = "gqtokhostile"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{i}.png"\r\n'
             f"Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n" for i, data in enumerate(files)]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def shapes(quick: bool) -> dict[str, tuple[bytes, float]]:
    """Each hostile shape as one pre-built request, and the seconds its client spends per byte (0: at once)."""
    big = noise_png(1024)
    json_big = json.dumps({"images": [base64.b64encode(big).decode()] * (7 if not quick else 3)}).encode()
    raw_big = big + b"\0" * (30 * MIB - len(big))  # Pillow ignores what follows the image
    parts, kind = multipart([noise_png(256, i) for i in range(32)])
    flat = json.dumps({"images": [base64.b64encode(flat_png(1024)).decode()] * 32}).encode()
    slow_body = noise_png(256)
    return {"json_big": (request_bytes("/v1/tokenize", json_big, "application/json"), 0.0),
            "raw_big": (request_bytes("/v1/tokenize", raw_big, "image/png"), 0.0),
            "multipart": (request_bytes("/v1/tokenize", parts, kind), 0.0),
            "many_flat": (request_bytes("/v1/tokenize", flat, "application/json"), 0.0),
            "slow": (request_bytes("/v1/tokenize", slow_body, "image/png"), 1 / 16)}


async def send_slowly(port: int, request: bytes, seconds_per_byte: float, limit_s: float) -> tuple[int | str, float]:
    """Headers at once, then the body a byte at a time, until the server answers or `limit_s` passes."""
    start = time.perf_counter()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        head, _, body = request.partition(b"\r\n\r\n")
        writer.write(head + b"\r\n\r\n")
        answer = asyncio.ensure_future(reader.readline())
        for i in range(len(body)):
            if answer.done() or time.perf_counter() - start > limit_s:
                break
            writer.write(body[i:i + 1])
            await asyncio.sleep(seconds_per_byte)
        line = await asyncio.wait_for(answer, limit_s)
        writer.close()
    except (ConnectionError, OSError, asyncio.TimeoutError) as e:
        return type(e).__name__, time.perf_counter() - start
    return (int(line.split()[1]) if line else "closed"), time.perf_counter() - start


async def wave(port: int, request: bytes, seconds_per_byte: float, n: int) -> dict:
    if seconds_per_byte:
        results = await asyncio.gather(*(send_slowly(port, request, seconds_per_byte, 30) for _ in range(n)))
    else:
        results = [(s, t) for s, t, _ in await asyncio.gather(*(send_raw(port, request) for _ in range(n)))]
    return {"statuses": dict(Counter(str(s) for s, _ in results)),
            "median_s": round(float(np.median([t for _, t in results])), 3)}


def probe(url: str, started, stop, out) -> None:
    """In its own process: GET /metrics and /health/live every 50 ms; (time, path, latency) of each, failures and
    the round count. `started` is set after the first round (the waves wait for it)."""
    times, failures, rounds = [], Counter(), 0
    with httpx.Client(base_url=url, timeout=10) as client:
        while not stop.is_set() or rounds == 0:
            for path in ("/metrics", "/health/live"):
                start = time.perf_counter()
                try:
                    r = client.get(path)
                    times.append((time.time(), path, time.perf_counter() - start))
                    if r.status_code != 200:
                        failures[f"{path} {r.status_code}"] += 1
                except httpx.HTTPError as e:
                    failures[f"{path} {type(e).__name__}"] += 1
            rounds += 1
            started.set()
            time.sleep(0.05)
    out.put((times, dict(failures), rounds))


class Sampler(threading.Thread):
    """The server's resident memory every 20 ms."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak_mib, self.stop = pid, 0.0, threading.Event()

    def run(self):
        while not self.stop.is_set():
            try:
                self.peak_mib = max(self.peak_mib, status_kib("VmRSS", self.pid) / 1024)
            except (OSError, ValueError):
                return
            time.sleep(0.02)


class WellFormed(threading.Thread):
    """One well-formed tokenize request after another; each must be 200 (the photo's tokens) or 429."""

    def __init__(self, url: str, image: bytes, expected: np.ndarray):
        super().__init__(daemon=True)
        self.url, self.image, self.expected, self.stop = url, image, expected, threading.Event()
        self.statuses, self.wrong = Counter(), 0

    def run(self):
        with httpx.Client(timeout=120) as client:
            while not self.stop.is_set():
                try:
                    r = client.post(f"{self.url}/v1/tokenize", content=self.image,
                                    headers={"content-type": "image/png", "accept": "application/x-npy"})
                except httpx.HTTPError as e:
                    self.statuses[type(e).__name__] += 1
                    continue
                self.statuses[str(r.status_code)] += 1
                if r.status_code == 200 and not np.array_equal(np.load(io.BytesIO(r.content)), self.expected):
                    self.wrong += 1
                time.sleep(0.1)


def run_server(model, budget_mb: float, waves: dict, n: int, photo: bytes, extra: list[str]) -> dict:
    proc, url = start_server(model, ["--max-memory-mb", str(budget_mb), "--max-concurrent-requests", str(2 * n),
                                     *extra])
    try:
        return attack(url, proc.pid, waves, n, photo)
    finally:
        proc.terminate()
        proc.wait(60)


def attack(url: str, pid: int | None, waves: dict, n: int, photo: bytes) -> dict:
    """The waves against a running server at `url`; its memory read from /proc/PID (None: not measured here,
    e.g. a container, whose cgroup the caller reads)."""
    port = int(url.rsplit(":", 1)[1])
    info = httpx.get(f"{url}/info").json()["memory"]
    budget_mb = info["budget_mb"]
    expected = np.load(io.BytesIO(httpx.post(f"{url}/v1/tokenize", content=photo, headers={
        "content-type": "image/png", "accept": "application/x-npy"}, timeout=60).content))
    ctx = multiprocessing.get_context("spawn")
    started, stop, out = ctx.Event(), ctx.Event(), ctx.Queue()
    prober = ctx.Process(target=probe, args=(url, started, stop, out))
    prober.start()
    started.wait(60)
    sampler, steady = Sampler(pid) if pid else None, WellFormed(url, photo, expected)
    if sampler:
        sampler.start()
    steady.start()
    results = {}
    spans = {}
    for name, (request, pace) in waves.items():
        t0, start = time.perf_counter(), time.time()
        results[name] = asyncio.run(wave(port, request, pace, n)) | {"seconds": round(time.perf_counter() - t0, 1)}
        spans[name] = (start, time.time())
        print(f"  {name}: {results[name]}", file=sys.stderr)
    steady.stop.set()
    steady.join()
    stop.set()
    times, failures, rounds = out.get(timeout=30)
    worst = {path: round(max((s for _, p, s in times if p == path), default=0.0), 3)
             for path in ("/metrics", "/health/live")}
    for name, (start, end) in spans.items():  # which wave slowed the probes
        results[name]["probe_worst_s"] = {path: round(max((s for t, p, s in times if p == path and start <= t <= end),
                                                          default=0.0), 3) for path in worst}
    prober.join()
    peak = sampler_peak = None
    if sampler:
        sampler.stop.set()
        peak, sampler_peak = status_kib("VmHWM", pid) / 1024, sampler.peak_mib
    server_errors = sum(c for w in results.values() for s, c in w["statuses"].items() if s.startswith("5"))
    return {"budget_mb": budget_mb, "request_memory_mb": info["requests_mb"], "waves": results,
            "peak_resident_mib": peak and round(peak, 1), "peak_sampled_mib": sampler_peak and round(sampler_peak, 1),
            "under_budget": peak is None or peak < budget_mb, "server_errors": server_errors,
            "probe_worst_s": worst, "probe_rounds": rounds, "probe_failures": failures,
            "well_formed": {"statuses": dict(steady.statuses), "wrong_tokens": steady.wrong}}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(REPO / "models" / "default"))
    p.add_argument("--budget-mb", type=float, default=1740.0, help="the server's --max-memory-mb (compose's value)")
    p.add_argument("--refused-budget-mb", type=float, default=800.0, help="the budget of the refused flood's server")
    p.add_argument("--quick", action="store_true", help="12 requests per wave, smaller JSON bodies, slow uploads "
                                                         "cut after 4 s (< 60 s)")
    p.add_argument("--url", help="attack this running server instead (a container: its memory is the caller's to "
                                 "read; no refused flood)")
    p.add_argument("--out", help="result JSON (default benchmarks/results/hostile[_quick].json)")
    args = p.parse_args(argv)
    n = 12 if args.quick else 64
    extra = ["--body-timeout-s", "4"] if args.quick else []  # the default is 10 s
    waves = shapes(args.quick)
    photo = png_bytes(test_images(1, 256)[0])
    t0 = time.perf_counter()
    if args.url:
        return {"benchmark": "hostile", "quick": args.quick, "requests_per_wave": n,
                "hostile": attack(args.url, None, waves, n, photo), "seconds": round(time.perf_counter() - t0, 1)}
    result = {"benchmark": "hostile", "quick": args.quick, "requests_per_wave": n,
              "hostile": run_server(args.model, args.budget_mb, waves, n, photo, extra),
              "refused_flood": run_server(args.model, args.refused_budget_mb, {"json_big": waves["json_big"]}, n,
                                          photo, extra)}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["targets"] = {k: {"under_budget": r["under_budget"], "no_5xx": r["server_errors"] == 0,
                             "probes_under_1s": max(r["probe_worst_s"].values()) < 1.0,
                             "admitted_well_formed_complete": set(r["well_formed"]["statuses"]) <= {"200", "429"}
                             and r["well_formed"]["wrong_tokens"] == 0}
                         for k, r in (("hostile", result["hostile"]), ("refused_flood", result["refused_flood"]))}
    path = write_result(result, "hostile", args.quick, args.out)
    print(json.dumps(result["targets"]), f"-> {path}")
    return result


if __name__ == "__main__":
    main()
