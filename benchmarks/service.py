"""The served tokenizer against its in-process ceiling, PyTorch eager, and itself with batching off.

    python benchmarks/service.py [--model DIR] [--concurrency 1 4 16 64] [--seconds 10] [--quick]

One run, side by side, on one model (default: models/default) and 256x256 photos:
  server          a real `gqtok serve` (uvicorn, loopback) with its default dynamic batching; closed-loop
                  clients at each concurrency send single-image requests (PNG to /v1/tokenize, an npy
                  grid to /v1/detokenize) and send the next as soon as the answer is back
  server_nobatch  the same server with --max-batch-size 1
  inprocess       TokenizerRuntime called directly on decoded arrays at the batch sizes the server
                  forms (min(concurrency, max batch size)): the ceiling, no HTTP, no PNG, no queue
  torch_eager     the same architecture in PyTorch eager (random weights: speed does not depend on them)
Also: the GQ selection's share of tokenize time; the exact selection (the k-d tree search) against the
exhaustive float32 argmax on onnxruntime's MatMul (the CPU selection before it was exact), called in turn in
the same run, both with one thread per core and both on one thread; the share of the codebook the tree
examines; the selection's peak memory (tracemalloc) at K = 2^16 for growing batches; the model's FLOPs per
image (torch FLOP counter) and the GFLOP/s it achieves, against this machine's measured float32
matrix-multiply GFLOP/s.
The load generator runs on the same machine and takes CPU from the server: the figures are what
one box does, client included. Writes benchmarks/results/service.json (--quick: service_quick.json).
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
import tracemalloc
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"
NPY = "application/x-npy"
SIZE = 256


def test_images(n: int, size: int = SIZE) -> list[np.ndarray]:
    """Real held-out photo crops when the photo set is there, else smooth synthetic images."""
    from gqtok.photos import HELDOUT
    from gqtok.training.data import DEFAULT_DATA_DIR

    out = []
    for i in range(n):
        path = REPO / DEFAULT_DATA_DIR / f"{HELDOUT[i % len(HELDOUT)]}.jpg"
        if path.exists():
            with Image.open(path) as im:
                w, h = im.size
                img = im.convert("RGB").crop(((w - size) // 2, (h - size) // 2, (w + size) // 2, (h + size) // 2))
        else:
            yy, xx = np.mgrid[0:size, 0:size] / size
            img = Image.fromarray((np.stack([xx, yy, (xx + yy) / 2 + 0.1 * i], -1) % 1 * 255).astype(np.uint8))
        out.append(np.asarray(img))
    return out


def write_result(result: dict, name: str, quick: bool, out: Path | str | None = None) -> Path:
    """Write a benchmark's result as JSON: `out`, else benchmarks/results/NAME.json (NAME_quick.json for --quick)."""
    path = Path(out or RESULTS / f"{name}{'_quick' if quick else ''}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1).replace(str(REPO) + os.sep, "") + "\n")  # repo-relative paths
    return path


def png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def start_server(model: Path | None, extra: list[str], asgi_app: str | None = None) -> tuple[subprocess.Popen, str]:
    """`gqtok serve --model MODEL EXTRA...` on a free port, or with `asgi_app` ("module:name") plain uvicorn
    serving that app; (process, base URL) once /health/ready answers 200."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = (["uvicorn", asgi_app, "--no-access-log"] if asgi_app else ["gqtok.cli", "serve", "--model", str(model)])
    proc = subprocess.Popen([sys.executable, "-m", *command, "--port", str(port), "--log-level", "warning", *extra],
                            cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    if wait_ready(url):
        return proc, url
    proc.kill()
    raise RuntimeError("server did not become ready")


def wait_ready(url: str, seconds: float = 60.0) -> bool:
    """Whether url/health/ready answers 200 within `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health/ready", timeout=1).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    return False


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


def serve_cases(name: str, model: Path, flags: list[str], pngs: list[bytes], grids: list[bytes],
                concurrencies: list[int], seconds: float) -> tuple[list[dict], dict]:
    import psutil

    proc, url = start_server(model, flags)
    rows = []
    try:
        info = httpx.get(f"{url}/info").json()
        server = psutil.Process(proc.pid)
        for c in concurrencies:
            for route, bodies, ct in (("/v1/tokenize", pngs, "image/png"), ("/v1/detokenize", grids, NPY)):
                cpu_before = sum(server.cpu_times()[:2])  # user + system, every thread of the server
                row = asyncio.run(closed_loop(url, route, bodies, {"content-type": ct, "accept": NPY}, c, seconds))
                row["server_cpu_ms_per_image"] = round(
                    1e3 * (sum(server.cpu_times()[:2]) - cpu_before) / max(1, row["requests"] + row["errors"]), 2)
                rows.append({"case": name, "route": route, **row})
                print(f"{name:<15} {route:<15} c={c:<3} {row['images_per_s']:>7.2f} img/s  p50 {row['p50_ms']} ms  "
                      f"p95 {row['p95_ms']}  p99 {row['p99_ms']}  errors {row['errors']}", flush=True)
        info["rss_mib"] = round(psutil.Process(proc.pid).memory_info().rss / 2**20, 1)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    return rows, info


def cpu_seconds_per_call(fn, calls: int = 5) -> float:
    """CPU seconds (every thread of this process) per call of fn, after one warm-up call."""
    fn()
    start = time.process_time()
    for _ in range(calls):
        fn()
    return (time.process_time() - start) / calls


def per_call_seconds(fn, seconds: float, min_calls: int = 3) -> float:
    """Median wall time of fn() over at least `min_calls` calls or `seconds`, after one warm-up call."""
    fn()
    times, end = [], time.perf_counter() + seconds
    while len(times) < min_calls or time.perf_counter() < end:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def paired_seconds(fns, seconds: float, min_rounds: int = 3) -> list[float]:
    """Median wall time of each of fns, called in turn (a round calls each once) for at least `min_rounds` rounds
    or `seconds`, after one warm-up round: a machine whose speed drifts slows every arm alike."""
    for fn in fns:
        fn()
    times, end = [[] for _ in fns], time.perf_counter() + seconds
    while len(times[0]) < min_rounds or time.perf_counter() < end:
        for fn, t_fn in zip(fns, times):
            t = time.perf_counter()
            fn()
            t_fn.append(time.perf_counter() - t)
    return [float(np.median(t)) for t in times]


def inprocess_cases(rt, images: list[np.ndarray], batch_sizes: list[int], seconds: float) -> list[dict]:
    """The ceiling: the runtime on decoded arrays, per batch size; tokenize split into encode and GQ select. The
    exact selection beside the exhaustive float32 argmax (its products on onnxruntime's MatMul), called in turn:
    both with one thread per core, and both on one thread (per-core work)."""
    from gqtok.core import layout
    from gqtok.core.select import GaussianQuantizer

    rows = []
    matmul, matmul_one_thread = ort_matmul(0), ort_matmul(1)
    ids = rt.tokenize(np.stack(images[:1]))
    one_thread = GaussianQuantizer(rt.quantizer.codebook, rt.quantizer.beta, threads=1)
    one_thread.tree = rt.quantizer.tree
    for b in batch_sizes:
        batch = np.stack([images[i % len(images)] for i in range(b)])
        grids = np.repeat(ids, b, axis=0)
        mu, logvar = rt.encode(batch)
        enc = per_call_seconds(lambda: rt.encode(batch), seconds / 4)
        d = rt.manifest.token_dim
        flat_mu, flat_lv = (layout.group(x, d).reshape(-1, d) for x in (mu, logvar))
        sel, sel32 = paired_seconds([lambda: rt.select(mu, logvar),
                                     lambda: rt.quantizer.select_float32(flat_mu, flat_lv, matmul=matmul)], seconds / 3)
        sel1, sel32_1 = paired_seconds([lambda: one_thread.select(flat_mu, flat_lv),
                                        lambda: one_thread.select_float32(flat_mu, flat_lv, matmul=matmul_one_thread)],
                                       seconds / 3)
        stats = {}
        rt.quantizer.select(flat_mu, flat_lv, stats=stats)
        tok = per_call_seconds(lambda: rt.tokenize(batch), seconds / 4)  # what the server calls: encode + select
        det = per_call_seconds(lambda: rt.detokenize(grids), seconds / 4)
        tok_cpu = cpu_seconds_per_call(lambda: rt.tokenize_posterior(batch))  # the server's call, PNG decode aside
        det_cpu = cpu_seconds_per_call(lambda: rt.detokenize(grids))
        rows.append({"case": "inprocess", "batch_size": b,
                     "tokenize_images_per_s": round(b / tok, 2), "detokenize_images_per_s": round(b / det, 2),
                     "tokenize_cpu_ms_per_image": round(1e3 * tok_cpu / b, 2),
                     "detokenize_cpu_ms_per_image": round(1e3 * det_cpu / b, 2),
                     "encode_ms_per_image": round(1e3 * enc / b, 2), "select_ms_per_image": round(1e3 * sel / b, 2),
                     "select_float32_argmax_ms_per_image": round(1e3 * sel32 / b, 2),
                     "exact_select_over_float32_argmax": round(sel / sel32, 3),
                     "one_thread_select_ms_per_image": round(1e3 * sel1 / b, 2),
                     "one_thread_select_float32_argmax_ms_per_image": round(1e3 * sel32_1 / b, 2),
                     "one_thread_exact_select_over_float32_argmax": round(sel1 / sel32_1, 3),
                     "codebook_share_examined": round(stats["scored"] / stats["pairs"], 4),
                     "gq_share_of_tokenize": round(sel / (enc + sel), 3)})
        print(f"inprocess       batch {b:<3} tokenize {rows[-1]['tokenize_images_per_s']:>7.2f} img/s  detokenize "
              f"{rows[-1]['detokenize_images_per_s']:>7.2f} img/s  GQ share {rows[-1]['gq_share_of_tokenize']:.1%}", flush=True)
    return rows


def selection_memory(rt, batch_sizes: list[int]) -> list[dict]:
    """Peak memory the GQ selection allocates (tracemalloc sees numpy's buffers) for growing batches.

    Bounded means: the input's size plus a constant (the score chunks), never tokens x K."""
    h = w = SIZE // rt.manifest.downsample
    rng = np.random.default_rng(0)
    rows = []
    for b in batch_sizes:
        mu = rng.standard_normal((b, rt.manifest.latent_channels, h, w), dtype=np.float32)
        logvar = np.full_like(mu, -1.0)
        tracemalloc.start()
        rt.select(mu, logvar)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        tokens = b * h * w * rt.manifest.tokens_per_position
        rows.append({"batch_size": b, "tokens": tokens, "peak_mib": round(peak / 2**20, 2),
                     "input_mib": round((mu.nbytes + logvar.nbytes) / 2**20, 2),
                     "full_score_matrix_mib": round(tokens * rt.manifest.num_codes * 4 / 2**20, 1)})
    return rows


def torch_model(manifest):
    import torch

    from gqtok.training.model import GaussianVAE, VAEConfig

    torch.manual_seed(0)
    return GaussianVAE(VAEConfig(**manifest.training["model"])).eval()


def torch_eager_cases(manifest, images: list[np.ndarray], batch_sizes: list[int], seconds: float) -> list[dict]:
    import torch

    model = torch_model(manifest)
    rows = []
    with torch.inference_mode():
        for b in batch_sizes:
            x = torch.from_numpy(np.stack([images[i % len(images)] for i in range(b)])).permute(0, 3, 1, 2).float() / 127.5 - 1
            mu, _ = model.encoder(x)
            enc = per_call_seconds(lambda: model.encoder(x), seconds / 2)
            dec = per_call_seconds(lambda: model.decoder(mu), seconds / 2)
            rows.append({"case": "torch_eager", "batch_size": b, "encode_images_per_s": round(b / enc, 2),
                         "decode_images_per_s": round(b / dec, 2)})
            print(f"torch_eager     batch {b:<3} encode {b / enc:>7.2f} img/s  decode {b / dec:>7.2f} img/s", flush=True)
    return rows


def model_flops(manifest) -> dict:
    """FLOPs per 256x256 image (a multiply-add counts 2): encoder, decoder (torch's counter), GQ select's exhaustive
    product (closed form, [tokens, 2d] x [2d, K]: what the float32 argmax computes)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model = torch_model(manifest)
    x = torch.zeros(1, 3, SIZE, SIZE)
    with torch.inference_mode():
        with FlopCounterMode(display=False) as counter:
            mu, _ = model.encoder(x)
        enc = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            model.decoder(mu)
        dec = counter.get_total_flops()
    m = manifest
    tokens = (SIZE // m.downsample) ** 2 * m.tokens_per_position
    gq = 2 * tokens * m.num_codes * 2 * m.token_dim  # [tokens, 2d] x [2d, K]
    return {"encoder_gflop": round(enc / 1e9, 3), "decoder_gflop": round(dec / 1e9, 3), "gq_select_gflop": round(gq / 1e9, 3)}


def ort_matmul(threads: int):
    """f(a, b) -> a @ b in float32 by onnxruntime's MatMul on the CPU, `threads` intra-op threads (0: one per core)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    spec = helper.make_tensor_value_info
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "matmul",
                              [spec("a", TensorProto.FLOAT, ["M", "N"]), spec("b", TensorProto.FLOAT, ["N", "P"])],
                              [spec("c", TensorProto.FLOAT, ["M", "P"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads sleep, as in the runtime
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return lambda a, b: sess.run(None, {"a": a, "b": b})[0]


def matmul_gflops(threads: int, n: int = 2048) -> float:
    """This machine's float32 GEMM rate through onnxruntime (the kernels the model runs on), n x n."""
    matmul = ort_matmul(threads)
    a = np.random.default_rng(0).random((n, n), dtype=np.float32)
    t = per_call_seconds(lambda: matmul(a, a), 1.0)
    return round(2 * n**3 / t / 1e9, 1)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(REPO / "models" / "default"), help="model directory")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--seconds", type=float, default=10.0, help="per server case")
    ap.add_argument("--max-batch-size", type=int, default=8, help="the server's batch limit (and the ceiling's)")
    ap.add_argument("--quick", action="store_true", help="concurrency 1 and 16, 2 s per case (< 60 s in all)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/service[_quick].json)")
    args = ap.parse_args(argv)
    concurrencies = [1, 16] if args.quick else args.concurrency
    seconds = 2.0 if args.quick else args.seconds
    out = Path(args.out or RESULTS / f"service{'_quick' if args.quick else ''}.json")

    from gqtok.core.artifact import load_artifact
    from gqtok.service.requests import npy_bytes
    from gqtok.service.runtime import TokenizerRuntime

    model = Path(args.model)
    artifact = load_artifact(model)
    images = test_images(16)
    pngs = [png_bytes(x) for x in images]
    rt = TokenizerRuntime(artifact)
    grids = [npy_bytes(rt.tokenize(x[None]).astype(np.uint16)) for x in images]
    batch_sizes = sorted({min(c, args.max_batch_size) for c in concurrencies})

    inprocess = inprocess_cases(rt, images, batch_sizes, seconds)
    memory = selection_memory(rt, [1, 8, 32] if args.quick else [1, 8, 32, 128])
    flops = model_flops(artifact.manifest)
    eager = torch_eager_cases(artifact.manifest, images, batch_sizes, seconds)
    del rt  # its sessions hold threads and memory the server should have
    flags = ["--max-batch-size", str(args.max_batch_size)]
    served, info = serve_cases("server", model, flags, pngs, grids, concurrencies, seconds)
    nobatch, info_nobatch = serve_cases("server_nobatch", model, ["--max-batch-size", "1"], pngs, grids,
                                        concurrencies, seconds)

    cores = os.cpu_count() or 1
    gemm = {"threads_1": matmul_gflops(1), f"threads_{cores}": matmul_gflops(cores)}
    summary = {}
    for route, key in (("/v1/tokenize", "tokenize_images_per_s"), ("/v1/detokenize", "detokenize_images_per_s")):
        name = route.rsplit("/", 1)[1]
        sat = max(r["images_per_s"] for r in served if r["route"] == route)
        sat_nb = max(r["images_per_s"] for r in nobatch if r["route"] == route)
        best = max(inprocess, key=lambda r: r[key])  # the ceiling: the best batch size the server could form
        # CPU per image at the highest concurrency, against the in-process call at the batch the server forms there
        top = max(r["concurrency"] for r in served)
        server_cpu = next(r["server_cpu_ms_per_image"] for r in served if r["route"] == route and r["concurrency"] == top)
        same_batch = next(r for r in inprocess if r["batch_size"] == min(top, args.max_batch_size))
        summary[name] = {"server_saturation_images_per_s": sat, "server_nobatch_saturation_images_per_s": sat_nb,
                         "inprocess_ceiling_images_per_s": best[key], "ceiling_batch_size": best["batch_size"],
                         "server_over_ceiling": round(sat / best[key], 3),
                         "server_over_nobatch": round(sat / sat_nb, 3),
                         "server_cpu_ms_per_image": server_cpu,
                         "inprocess_cpu_ms_per_image": same_batch[f"{name}_cpu_ms_per_image"],
                         "server_cpu_over_inprocess": round(server_cpu / same_batch[f"{name}_cpu_ms_per_image"], 3)}
    at1 = inprocess[0]  # batch 1: per-image times of each stage
    enc_s = at1["encode_ms_per_image"] / 1e3
    dec_s = 1 / at1["detokenize_images_per_s"]
    # (the exact GQ selection has no GFLOP/s: the tree does a data-dependent part of gq_select_gflop's product)
    summary["achieved_gflop_per_s_at_batch_1"] = {"encoder": round(flops["encoder_gflop"] / enc_s, 1),
                                                  "decoder": round(flops["decoder_gflop"] / dec_s, 1),
                                                  "machine_sgemm": gemm[f"threads_{cores}"]}
    summary["gq_share_of_tokenize"] = {str(r["batch_size"]): r["gq_share_of_tokenize"] for r in inprocess}
    summary["exact_select_over_float32_argmax"] = {str(r["batch_size"]): r["exact_select_over_float32_argmax"]
                                                   for r in inprocess}
    summary["one_thread_exact_select_over_float32_argmax"] = {
        str(r["batch_size"]): r["one_thread_exact_select_over_float32_argmax"] for r in inprocess}
    summary["codebook_share_examined"] = {str(r["batch_size"]): r["codebook_share_examined"] for r in inprocess}
    summary["onnxruntime_over_torch_eager"] = {
        str(o["batch_size"]): {"encode": round(1e3 / o["encode_ms_per_image"] / t["encode_images_per_s"], 2),
                               "decode": round(o["detokenize_images_per_s"] / t["decode_images_per_s"], 2)}
        for o, t in zip(inprocess, eager)}
    for k, v in summary.items():
        print(f"{k}: {v}", flush=True)

    result = {"benchmark": "service", "quick": args.quick, "model": str(model), "image_size": [SIZE, SIZE],
              "seconds_per_case": seconds, "cpu_count": cores, "python": platform.python_version(),
              "provider": info["providers"], "selector": info["selector"], "server_rss_mib": info["rss_mib"],
              "server_nobatch_rss_mib": info_nobatch["rss_mib"], "summary": summary, "flops": flops,
              "sgemm_gflop_per_s": gemm, "selection_memory": memory, "server": served,
              "server_nobatch": nobatch, "inprocess": inprocess, "torch_eager": eager}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1).replace(str(REPO) + os.sep, "") + "\n")  # repo-relative paths
    return result


if __name__ == "__main__":
    main()
