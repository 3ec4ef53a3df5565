"""service/memory.py: the measured memory model, and the limits that `--max-memory-mb` sets in a real server."""

from __future__ import annotations

import io
import subprocess
import sys

import httpx
import numpy as np
import pytest
from PIL import Image

from gqtok.service import memory

MIB = 2**20


def test_peak_above_now_sees_a_transient_allocation():
    size = 300 * MIB

    def allocate_and_free():
        block = np.ones(size // 8)  # touched, so resident
        return float(block[-1])

    peak = memory.peak_above_now(allocate_and_free)
    assert 0.9 * size < peak < 1.2 * size, peak / MIB
    assert memory.peak_above_now(lambda: None) < 20 * MIB  # and the reset works: no earlier peak is reported


def test_call_memory_fit_recovers_a_line_and_errs_high_on_noise():
    call = memory.CallMemory.fit((1000, 4000), (5000 + 100 * 1000, 5000 + 100 * 4000))
    assert call.fixed_bytes == pytest.approx(5000) and call.bytes_per_pixel == pytest.approx(100)
    noisy = memory.CallMemory.fit((1000, 4000), (9000, 8000))  # smaller peak at the larger size
    assert noisy.fixed_bytes == 0 and noisy.bytes(4000) >= 9000


def png(side: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(side).integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.slow
def test_memory_budget_sets_the_pixel_limits(tiny_model, start_server):
    roomy = start_server([tiny_model], "--max-memory-mb", "100000")
    info = httpx.get(f"{roomy.url}/info").json()
    model = info["memory"]["models"]["tiny"]
    assert info["limits"]["max_image_pixels"] == 2**20  # a roomy budget leaves the default limits
    assert 0 < model["tokenize"]["bytes_per_pixel"] and 0 < model["detokenize"]["bytes_per_pixel"]

    # A budget that the measured model says holds batches of about 512x512 pixels in every worker at once: enough
    # headroom (tens of MiB) that the second server's own few MiB of difference when ready barely moves it.
    target = 512 * 512
    per_pixel = model["tokenize"]["bytes_per_pixel"] + model["detokenize"]["bytes_per_pixel"]
    fixed = (model["tokenize"]["fixed_mb"] + model["detokenize"]["fixed_mb"]) * MIB
    need = info["memory"]["resident_when_ready_mb"] * MIB + fixed + per_pixel * target
    budget = need / (1 - info["memory"]["reserve_fraction"]) / MIB
    tight = start_server([tiny_model], "--max-memory-mb", f"{budget:.1f}")
    limits = httpx.get(f"{tight.url}/info").json()["limits"]
    assert limits["max_batch_pixels"] == limits["max_image_pixels"]
    assert 0.4 * target < limits["max_image_pixels"] < 2.5 * target, limits  # measured again: close, not equal
    side_over = int((2 * limits["max_image_pixels"]) ** 0.5) // 8 * 8
    r = httpx.post(f"{tight.url}/v1/tokenize", content=png(side_over), headers={"content-type": "image/png"},
                   timeout=60)
    assert r.status_code == 413 and r.json()["error_type"] == "image_too_large", r.text
    r = httpx.post(f"{tight.url}/v1/tokenize", content=png(64), headers={"content-type": "image/png"}, timeout=60)
    assert r.status_code == 200, r.text


@pytest.mark.slow
def test_too_small_a_budget_stops_the_server_with_the_figure_it_needs(tiny_model):
    out = subprocess.run([sys.executable, "-m", "gqtok.cli", "serve", "--port", "0", "--max-memory-mb", "20",
                          "--model", str(tiny_model)], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    text = out.stdout + out.stderr
    assert "--max-memory-mb 20 is too small" in text and "one 64x64 image needs at least" in text, text[-2000:]


def test_request_memory_refuses_what_does_not_fit_and_gives_it_back(tiny_model, start_server):
    """Concurrent JSON bodies of many images, each needing most of the request memory: those that do not fit get
    429 (memory) before they are parsed or decoded, the server's peak resident memory stays under its budget, and
    once they are done the memory is free again."""
    import base64
    from concurrent.futures import ThreadPoolExecutor

    server = start_server([tiny_model], "--max-memory-mb", "700", "--max-concurrent-requests", "64")
    info = httpx.get(f"{server.url}/info").json()["memory"]
    assert 0 < info["requests_mb"] < 700 and info["requests_held_mb"] == 0
    body = {"images": [base64.b64encode(png(600)).decode()] * 8}  # about 11.5 MB of JSON, 8 x 360,000 pixels
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda _: httpx.post(f"{server.url}/v1/tokenize", json=body, timeout=120), range(12)))
    statuses = sorted(r.status_code for r in answers)
    assert 200 in statuses and set(statuses) <= {200, 429}, statuses
    refused = [r.json() for r in answers if r.status_code == 429]
    assert refused and all("memory" in r["error"] for r in refused), refused[:2]
    peak_mib = memory.status_kib("VmHWM", server.proc.pid) / 1024
    assert peak_mib < 700, peak_mib
    assert httpx.get(f"{server.url}/info").json()["memory"]["requests_held_mb"] == 0
    alone = httpx.post(f"{server.url}/v1/tokenize", json=body, timeout=120)
    assert alone.status_code == 200
    too_big = {"images": [base64.b64encode(png(600)).decode()] * 16}  # could never fit: 413, not a retry
    r = httpx.post(f"{server.url}/v1/tokenize", json=too_big, timeout=120)
    assert r.status_code == 413 and "MiB for requests" in r.json()["error"], r.text
