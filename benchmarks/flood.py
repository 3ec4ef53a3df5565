"""Flood: far more concurrent requests than the server admits; refusals must be fast, the rest right, health live.

    python benchmarks/flood.py [--model DIR] [--requests 256] [--queue 8] [--json-bodies 4] [--quick]

A real `gqtok serve` with a small queue (`--max-queue-size`, default 8; at most 8 grids per request) gets
`--requests` tokenize requests at once (256x256 photo crops, one connection each), while `--json-bodies` senders
post JSON token bodies just under the 32 MiB body limit to /v1/detokenize, and a prober asks /health/live every
10 ms throughout. The flood's requests are pre-built bytes written on raw sockets (latency: connection to status
line); the JSON senders and the prober are processes of their own, so that no measurement includes the load
generator's own backlog (all of it shares the machine's cores with the server). Reported: statuses, the latency
of the refusals (429) and of the answers (200), every 200 checked against the tokens the server gave for that
image before the flood, the statuses of the JSON bodies (refused unparsed: 413 or 429), and /health/live's
latency (median and 99th percentile). Side by side, in the same run: the same flood against `bare_refuser`, plain
uvicorn refusing everything with no work at all, the floor of any refusal on this machine; the ratio of the
median refusals says what the service adds; and, where Debian's haproxy is installed, the same flood through
HAProxy in front of the same server, refusing in C (429) past queue + one batch of requests at the server
(`via_haproxy`; the route docker-compose.yml's balancer opens). Targets (issue 16): 429s in a median under 50 ms, /health/live's
p99 under 100 ms. Writes benchmarks/results/flood.json (--quick: 64 requests, one 8 MiB JSON body, flood_quick.json).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import multiprocessing
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.service import png_bytes, start_server, test_images, wait_ready, write_result  # noqa: E402
from gqtok.service.app import RequestBody  # noqa: E402

NPY = "application/x-npy"


def percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)) * 1e3, 2) if values else None  # ms


BARE_REFUSAL = json.dumps({"error": "queue is full", "error_type": "queue_full"}).encode()


async def bare_refuser(scope, receive, send):
    """The floor the flood is measured against: a bare ASGI app under the same uvicorn that refuses every request
    (200 on /health/ready) with no routing, no state and no work, dropping bodies the way the service does
    (answer first, then read and drop the rest up to 8 MiB)."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        return await send({"type": "lifespan.shutdown.complete"})
    status = 200 if scope["path"] == "/health/ready" else 429
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(BARE_REFUSAL)).encode())]})
    await send({"type": "http.response.body", "body": BARE_REFUSAL, "more_body": True})
    declared = int(dict(scope["headers"]).get(b"content-length", b"0"))
    more = declared > 0
    while more and declared <= RequestBody.DROP_BYTES:
        more = (await receive()).get("more_body", False)
    await send({"type": "http.response.body", "body": b""})


MAX_GRIDS = 8  # the server's --max-images-per-request (the flood's tokenize requests carry one image each)


def json_tokens_body(nbytes: int) -> bytes:
    """A JSON detokenize body of about `nbytes`: one huge grid of token ids."""
    row = "[" + ", ".join(["1234"] * 1000) + "]"
    rows = max(1, nbytes // (len(row) + 2))
    return ('{"tokens": [' + ", ".join([row] * rows) + "]}").encode()


def request_bytes(path: str, body: bytes, content_type: str, accept: str = "application/json") -> bytes:
    """A whole HTTP/1.1 request, built once: the flood writes it with one call, so the load generator adds
    microseconds per request, not the milliseconds of an HTTP client library, and never queues its own requests."""
    head = (f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: {content_type}\r\naccept: {accept}\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
    return head.encode() + body


async def send_raw(port: int, request: bytes) -> tuple[int | str, float, bytes]:
    """(status or the connection error's name, seconds until the status line arrived, body)."""
    start, stage = time.perf_counter(), "connect"
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        stage = "send"
        writer.write(request)
        stage = "status"
        status_line = await reader.readline()
        seconds = time.perf_counter() - start
        stage = "body"
        rest = await reader.read()  # connection: close, so the answer ends at EOF
        writer.close()
    except (ConnectionError, OSError) as e:
        return f"{type(e).__name__} at {stage}", time.perf_counter() - start, b""
    if not status_line:
        return "closed before the status line", time.perf_counter() - start, b""
    _, _, body = rest.partition(b"\r\n\r\n")  # the server's answers carry content-length, never chunks
    return int(status_line.split()[1]), seconds, body


def probe_health(url: str, stop, out) -> None:
    """In a process of its own (so that the flood's client work cannot delay it): GET /health/live every 10 ms
    until `stop` is set; then put (latencies, failures) on `out`."""
    live, failures = [], Counter()
    with httpx.Client(base_url=url, timeout=5) as client:
        while not stop.is_set():
            start = time.perf_counter()
            try:
                r = client.get("/health/live", headers={"connection": "close"})
                live.append(time.perf_counter() - start)
                if r.status_code != 200:
                    failures[r.status_code] += 1
            except httpx.HTTPError as e:
                failures[type(e).__name__] += 1
            time.sleep(0.01)
    out.put((live, dict(failures)))


def send_json_bodies(url: str, body: bytes, count: int, go, out) -> None:
    """In a process of its own (its uploads would otherwise hold up the flood's own event loop and so its
    measurements): once `go` is set, post `count` copies of the JSON token body at once, each from a thread;
    put [(status, seconds)] on `out`."""
    def post(_):
        start = time.perf_counter()
        try:  # httpx copes with a server that answers before the body is all sent
            r = httpx.post(f"{url}/v1/detokenize", content=body, headers={"content-type": "application/json"},
                           timeout=120)
            return r.status_code, time.perf_counter() - start
        except httpx.HTTPError as e:
            return type(e).__name__, time.perf_counter() - start

    go.wait()
    with ThreadPoolExecutor(max(1, count)) as pool:
        out.put(list(pool.map(post, range(count))))


async def flood(url: str, images: list[bytes], expected: list[np.ndarray], requests: int, json_bodies: int,
                json_bytes: int) -> dict:
    port = int(url.rsplit(":", 1)[1])
    tokenize_requests = [request_bytes("/v1/tokenize", data, "image/png", NPY) for data in images]
    big = json_tokens_body(json_bytes)
    ctx = multiprocessing.get_context("spawn")
    stop, out, go, json_out = ctx.Event(), ctx.Queue(), ctx.Event(), ctx.Queue()
    prober = ctx.Process(target=probe_health, args=(url, stop, out), daemon=True)
    json_sender = ctx.Process(target=send_json_bodies, args=(url, big, json_bodies, go, json_out), daemon=True)
    prober.start()
    json_sender.start()
    await asyncio.sleep(1.0)  # start-ups, then a baseline of health answers before the flood

    async def tokenize(i: int):
        k = i % len(images)
        status, seconds, body = await send_raw(port, tokenize_requests[k])
        right = bool(np.array_equal(np.load(io.BytesIO(body), allow_pickle=False), expected[k])) if status == 200 else None
        error_type = json.loads(body).get("error_type") if isinstance(status, int) and status != 200 else None
        return status, seconds, right, error_type

    flood_start = time.perf_counter()
    go.set()
    answers = await asyncio.gather(*(tokenize(i) for i in range(requests)))
    json_answers = await asyncio.to_thread(json_out.get, True, 120)
    flood_s = time.perf_counter() - flood_start
    await asyncio.sleep(0.2)
    stop.set()
    live, live_failures = await asyncio.to_thread(out.get, True, 60)
    prober.join(10)
    json_sender.join(10)
    statuses = Counter(a[0] for a in answers)
    refused = [a[1] for a in answers if a[0] == 429]
    served = [a[1] for a in answers if a[0] == 200]
    return {
        "flood_seconds": round(flood_s, 2),
        "statuses": {str(k): v for k, v in sorted(statuses.items(), key=str)},
        "refusals_by_type": dict(Counter(a[3] for a in answers if a[0] == 429)),
        "refused_median_ms": percentile(refused, 50), "refused_p99_ms": percentile(refused, 99),
        "answered_median_ms": percentile(served, 50), "answered_p99_ms": percentile(served, 99),
        "answered_right": sum(1 for a in answers if a[2]), "answered_wrong": sum(1 for a in answers if a[2] is False),
        "json_bodies": {"bytes": len(big), "statuses": dict(Counter(s for s, _ in json_answers)),
                        "median_ms": percentile([t for _, t in json_answers], 50)},
        "health_live": {"probes": len(live), "median_ms": percentile(live, 50), "p99_ms": percentile(live, 99),
                        "max_ms": percentile(live, 100), "failures": live_failures},
    }


HAPROXY_CONFIG = """\
global
    maxconn 4096
defaults
    mode http
    timeout connect 1s
    timeout client 120s
    timeout server 120s
frontend flood
    bind 127.0.0.1:{port}
    # admission in C, before any Python sees the request: past {limit} requests at the server, 429 at once
    acl health path_beg /health
    acl full be_conn(service) ge {limit}
    acl waiting queue(service) gt 0
    http-request return status 429 content-type application/json string "{{\\"error\\":\\"the tokenizer is busy: {limit} requests in flight\\",\\"error_type\\":\\"queue_full\\"}}" hdr retry-after 1 if !health full || !health waiting
    default_backend service
backend service
    server tokenizer 127.0.0.1:{server_port} maxconn {limit}
"""


def start_haproxy(server_url: str, limit: int, workdir: Path) -> tuple[subprocess.Popen, str] | tuple[None, str]:
    """Debian's HAProxy in front of the server with a connection limit: (process, URL), or (None, why not)."""
    exe = shutil.which("haproxy")
    if not exe:
        return None, "haproxy is not installed (apt-get install haproxy)"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = workdir / "haproxy.cfg"
    cfg.write_text(HAPROXY_CONFIG.format(port=port, limit=limit, server_port=server_url.rsplit(":", 1)[1]))
    proc = subprocess.Popen([exe, "-db", "-f", str(cfg)])
    url = f"http://127.0.0.1:{port}"
    if wait_ready(url, 10):
        return proc, url
    proc.kill()
    return None, "haproxy did not answer"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(REPO / "models" / "default"))
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--queue", type=int, default=8, help="the server's --max-queue-size")
    ap.add_argument("--json-bodies", type=int, default=4, help="JSON token bodies sent during the flood")
    ap.add_argument("--json-mib", type=float, default=31.5, help="size of each (under the 32 MiB body limit)")
    ap.add_argument("--quick", action="store_true", help="64 requests, one 8 MiB JSON body (< 60 s)")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/flood[_quick].json)")
    args = ap.parse_args(argv)
    if args.quick:
        args.requests, args.json_bodies, args.json_mib = 64, 1, 8.0
    # 8 grids per request at most: the JSON token bodies (8 MiB or more) are then past what the limits can need
    # for any model (json_tokens_limit), so they are refused unparsed (413) whenever they get past admission
    proc, url = start_server(Path(args.model), ["--max-queue-size", str(args.queue), "--max-batch-size", "8",
                                                "--max-images-per-request", str(MAX_GRIDS)])
    try:
        photos = test_images(4, size=256)
        images = [png_bytes(p) for p in photos]
        expected = []
        for data in images:  # each image's tokens, alone, before the flood
            r = httpx.post(f"{url}/v1/tokenize", content=data, headers={"content-type": "image/png", "accept": NPY},
                           timeout=60)
            r.raise_for_status()
            expected.append(np.load(io.BytesIO(r.content), allow_pickle=False))
        result = asyncio.run(flood(url, images, expected, args.requests, args.json_bodies, int(args.json_mib * 2**20)))
        # the same flood through HAProxy in front of the same server, refusing in C past queue + one batch
        with tempfile.TemporaryDirectory() as tmp:
            lb, lb_url = start_haproxy(url, args.queue + 8, Path(tmp))
            try:
                via_haproxy = (asyncio.run(flood(lb_url, images, expected, args.requests, args.json_bodies,
                                                 int(args.json_mib * 2**20))) if lb else {"skipped": lb_url})
            finally:
                if lb:
                    lb.terminate()
                    lb.wait(30)
    finally:
        proc.send_signal(signal.SIGTERM)
        exit_code = proc.wait(60)
    # the same flood, with the same JSON bodies, against the floor: uvicorn refusing everything with no work
    bare, bare_url = start_server(None, [], asgi_app="benchmarks.flood:bare_refuser")
    try:
        floor = asyncio.run(flood(bare_url, images, expected, args.requests, args.json_bodies,
                                  int(args.json_mib * 2**20)))
    finally:
        bare.terminate()
        bare.wait(60)
    result = {"model": Path(args.model).name, "requests": args.requests, "queue": args.queue, **result,
              "bare_uvicorn": {k: floor[k] for k in ("statuses", "refused_median_ms", "refused_p99_ms")},
              "refused_median_vs_bare": round(result["refused_median_ms"] / floor["refused_median_ms"], 2),
              "via_haproxy": via_haproxy,
              "server_exit_code": exit_code,
              "targets": {"refused_median_ms": 50, "health_live_p99_ms": 100}}
    write_result(result, "flood", args.quick, args.out)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
