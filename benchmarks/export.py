"""onnxruntime (CPU) against PyTorch eager: per-image encode and decode time, side by side in one run.

    python benchmarks/export.py [--run RUN_DIR] [--quick] [--threads N]

Without --run it times the `default` preset's architecture with fresh weights
(timing does not depend on the weights). Both runtimes get the same thread
count and run the same wrapped graphs (uint8 NHWC in, normalization inside;
float NHWC in [0, 1] out), alternating per repeat so that machine noise hits
both alike. Reports medians in ms per image and the torch / onnxruntime ratio;
writes benchmarks/results/export.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gqtok.export.exporter import DecoderGraph, EncoderGraph, export_run  # noqa: E402
from gqtok.core.artifact import load_artifact  # noqa: E402
from gqtok.service.runtime import TokenizerRuntime  # noqa: E402
from gqtok.training.model import PRESETS, GaussianVAE, VAEConfig  # noqa: E402
from gqtok.training.train import load_run  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def fresh_default_run(tmp: Path) -> Path:
    """Write a run directory holding the default architecture with random weights."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    cfg = VAEConfig(**PRESETS["default"]["model"])
    model = GaussianVAE(cfg)
    run = tmp / "default-untrained"
    run.mkdir()
    save_file({f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}, str(run / "model.safetensors"))
    (run / "config.json").write_text(json.dumps({"preset": "default", "model": cfg.to_dict(), "step": 0}))
    return run


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="training run to time (default: default preset, untrained)")
    ap.add_argument("--quick", action="store_true", help="few repeats (< 60 s)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="threads for both runtimes")
    ap.add_argument("--size", type=int, default=256, help="square image side (default 256)")
    ap.add_argument("--out", default=str(RESULTS / "export.json"))
    args = ap.parse_args(argv)
    repeats = 3 if args.quick else 15
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(args.run) if args.run else fresh_default_run(Path(tmp))
        export_run(run, Path(tmp) / "model", model_id="bench")
        rt = TokenizerRuntime(load_artifact(Path(tmp) / "model"), device="cpu", threads=args.threads)
        model, _ = load_run(run)
        enc, dec = EncoderGraph(model.encoder).eval(), DecoderGraph(model.decoder).eval()
        f, c = model.cfg.downsample, model.cfg.latent_channels
        rng = np.random.default_rng(0)
        rows = []
        for batch in (1, 8):
            images = rng.integers(0, 256, (batch, args.size, args.size, 3), dtype=np.uint8)
            latent = rng.standard_normal((batch, c, args.size // f, args.size // f)).astype(np.float32)
            timed = {
                ("encode", "torch"): lambda: enc(torch.from_numpy(images)),
                ("encode", "onnxruntime"): lambda: rt.encode(images),
                ("decode", "torch"): lambda: dec(torch.from_numpy(latent)),
                ("decode", "onnxruntime"): lambda: rt.decode(latent),
            }
            samples = {k: [] for k in timed}
            with torch.no_grad():
                for fn in timed.values():
                    fn()  # warm-up
                for _ in range(repeats):  # alternate so that noise hits both runtimes alike
                    for key, fn in timed.items():
                        t = time.perf_counter()
                        fn()
                        samples[key].append(time.perf_counter() - t)
            for direction in ("encode", "decode"):
                t_ms = 1e3 * statistics.median(samples[(direction, "torch")]) / batch
                o_ms = 1e3 * statistics.median(samples[(direction, "onnxruntime")]) / batch
                rows.append({"direction": direction, "batch": batch, "torch_ms_per_image": round(t_ms, 2),
                             "onnxruntime_ms_per_image": round(o_ms, 2), "torch_over_onnxruntime": round(t_ms / o_ms, 3)})

    result = {
        "benchmark": "export", "image_size": [args.size, args.size], "threads": args.threads, "repeats": repeats,
        "model": {"run": args.run or "default preset, untrained", "parameters": model.num_parameters()},
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "onnxruntime": __import__("onnxruntime").__version__, "cpu": platform.processor() or platform.machine()},
        "results": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'direction':<9} {'batch':>5} {'torch ms/img':>13} {'ort ms/img':>11} {'torch/ort':>9}")
    for r in rows:
        print(f"{r['direction']:<9} {r['batch']:>5} {r['torch_ms_per_image']:>13.2f} "
              f"{r['onnxruntime_ms_per_image']:>11.2f} {r['torch_over_onnxruntime']:>9.2f}")
    return result


if __name__ == "__main__":
    main()
