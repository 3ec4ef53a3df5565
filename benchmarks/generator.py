"""Sampling speed of the generator: with the KV cache against recomputing every prefix, side by side.

    python benchmarks/generator.py [--run runs/generator] [--batch 1 4] [--repeats 3] [--quick]

For each batch size, generate() samples whole token grids both ways, `repeats` times each (interleaved),
and reports the median tokens per second and the ratio. Without --run (or when the run is missing) it
times a randomly initialized model of the default generator config: speed does not depend on the weights.
--quick: batch 1 only, an 8x8 grid, 2 repeats (< 60 s). Writes benchmarks/results/generator.json
(--quick: generator_quick.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"


def build_model(run: Path | None, grid: tuple[int, int] | None):
    from gqtok.generator.model import ARTransformer, GeneratorConfig
    from gqtok.generator.train import load_generator

    if run is not None and (run / "config.json").exists():
        model, summary = load_generator(run)
        source = {"run": str(run), "val_bits_per_token": summary.get("val_bits_per_token")}
        if grid is None:
            return model, source
        cfg = model.cfg
    else:
        cfg, source = GeneratorConfig(), {"run": None, "weights": "random"}
    if grid is not None:
        cfg = GeneratorConfig(**{**cfg.__dict__, "grid": grid})
    torch.manual_seed(0)
    return ARTransformer(cfg).eval(), source | {"grid_override": list(grid) if grid else None}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", default=str(REPO / "runs" / "generator"), help="generator run (default runs/generator)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    grid = (8, 8) if args.quick else None
    batches, repeats = ([1], 2) if args.quick else (args.batch, args.repeats)
    model, source = build_model(Path(args.run), grid)
    rows = []
    for b in batches:
        times = {True: [], False: []}
        for r in range(repeats):
            for cached in (True, False):
                t0 = time.perf_counter()
                model.generate(b, seed=r, use_cache=cached)
                times[cached].append(time.perf_counter() - t0)
        tokens = b * model.cfg.seq_len
        row = {"batch": b, "tokens": tokens}
        for cached, name in ((True, "kv_cache"), (False, "no_cache")):
            med = statistics.median(times[cached])
            row[name] = {"median_s": med, "tokens_per_s": tokens / med, "runs_s": times[cached]}
        row["speedup_kv_cache"] = row["kv_cache"]["tokens_per_s"] / row["no_cache"]["tokens_per_s"]
        rows.append(row)
        print(f"batch {b}: {row['kv_cache']['tokens_per_s']:.0f} tokens/s with the KV cache, "
              f"{row['no_cache']['tokens_per_s']:.0f} without ({row['speedup_kv_cache']:.2f}x)", file=sys.stderr)
    result = {"benchmark": "generator", "quick": args.quick, "model": model.cfg.__dict__ | {"seq_len": model.cfg.seq_len},
              "parameters": sum(p.numel() for p in model.parameters()), "source": source,
              "machine": {"cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads()},
              "results": rows}
    if source.get("run"):
        result["source"]["run"] = str(Path(source["run"]).resolve().relative_to(REPO)) \
            if Path(source["run"]).resolve().is_relative_to(REPO) else source["run"]
    out = Path(args.out or RESULTS / ("generator_quick.json" if args.quick else "generator.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=list) + "\n")
    print(json.dumps({"results": [{k: r[k] for k in ("batch", "speedup_kv_cache")} for r in rows], "json": str(out)}))
    return result


if __name__ == "__main__":
    main()
