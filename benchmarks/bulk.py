"""Bulk tokenization: `gqtok tokenize`'s two engines against the in-process runtime's ceiling, in one run.

    python benchmarks/bulk.py [--model DIR] [--photos DIR] [--limit 240] [--size 256] [--quick]

The same photos (real ones: data/endless-sky by default), shorter side to `--size` and a centre crop, go through:
- ceiling: the runtime alone on views decoded beforehand (TokenizerRuntime.tokenize in batches of 1, 4, 16 and
  32, two rounds; the best is the ceiling, and its batch size the engines'): what tokenizing costs with decoding
  free;
- local: the local engine (decode thread + runtime), all shards, from the files;
- ray: the Ray engine on a local cluster started beforehand (its start-up is timed apart), from the files.
Reported: images/s of each and the ratios to the ceiling (targets: local >= 0.9, ray >= 0.7), end to end and
after each engine's first shard (start-up: the runtime or the actors, the first decodes), whether the two engines
wrote the same bytes, and the hours 1 M images would take (the start-up once, then the rate after it), and per
machine added (assuming Ray scales linearly with machines, which this single-machine run does not measure). Writes
benchmarks/results/bulk.json (--quick: 48 photos at 128, bulk_quick.json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.service import write_result  # noqa: E402


def steady(run: dict, ceiling: float) -> dict:
    """An engine's start-up (seconds to its first shard) and its rate after that, against the ceiling."""
    rate = run["files_per_s_after_first_shard"]  # one view per file here: files/s are images/s; None: one shard
    return {"first_shard_s": run["first_shard_s"], "images_per_s_after_first_shard": rate,
            "over_ceiling_after_first_shard": None if rate is None else round(rate / ceiling, 3)}


def main(argv=None) -> dict:
    from gqtok.bulk.preprocess import Preprocess
    from gqtok.bulk.shards import Job, file_views, list_inputs, run_local
    from gqtok.core.artifact import load_artifact
    from gqtok.core.models import find_model
    from gqtok.service.runtime import TokenizerRuntime

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(REPO / "models" / "default"))
    ap.add_argument("--photos", default=str(REPO / "data" / "endless-sky"))
    ap.add_argument("--limit", type=int, default=240, help="photos to tokenize")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--shard-size", type=int, default=32)
    ap.add_argument("--no-ray", action="store_true", help="skip the Ray engine")
    ap.add_argument("--quick", action="store_true", help="48 photos at 128x128")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if args.quick:
        args.limit, args.size, args.shard_size = 48, 128, 8
    paths = list_inputs([args.photos])[: args.limit]
    pre = Preprocess(size=args.size)
    model_dir = find_model(args.model)
    runtime = TokenizerRuntime(load_artifact(model_dir), device="cpu")
    f = runtime.manifest.downsample
    result = {"model": str(args.model), "photos": len(paths), "size": args.size, "cpus": os.cpu_count()}

    decode_job = Job(tuple(paths), Path("unused"), pre)
    t0 = time.perf_counter()  # the engines' own decoding (file_views: to_rgb, JPEG draft scaling, resize, crop)
    views = np.stack([file_views(p, decode_job, f)[0][0] for p in paths])
    result["decode_images_per_s"] = round(len(paths) / (time.perf_counter() - t0), 2)
    runtime.tokenize(views[:2])  # warm
    by_batch = {}
    for _ in range(2):  # two rounds, the best of each: a single pass swung by 20% between batch sizes
        for batch in (1, 4, 16, 32):  # which batch size the engines should use
            t0 = time.perf_counter()
            for i in range(0, len(views), batch):
                runtime.tokenize(views[i:i + batch])
            by_batch[batch] = max(by_batch.get(batch, 0.0), round(len(views) / (time.perf_counter() - t0), 2))
    ceiling = max(by_batch.values())
    best_batch = max(by_batch, key=by_batch.get)
    result["ceiling_images_per_s_by_batch"] = by_batch
    result["ceiling_images_per_s"] = ceiling
    result["engine_batch_size"] = best_batch

    with tempfile.TemporaryDirectory() as tmp:
        job = Job(tuple(paths), Path(tmp) / "local", pre, shard_size=args.shard_size, batch_size=best_batch)
        t0 = time.perf_counter()
        run = run_local(job, runtime, progress=False)["run"]
        local = len(paths) / (time.perf_counter() - t0)
        result["local"] = {"images_per_s": round(local, 2), "over_ceiling": round(local / ceiling, 3)} | steady(
            run, ceiling)
        if not args.no_ray:
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            import ray

            from gqtok.bulk.ray_engine import LOCAL_OBJECT_STORE_BYTES, run_ray

            t0 = time.perf_counter()
            ray.init(include_dashboard=False, log_to_driver=False, object_store_memory=LOCAL_OBJECT_STORE_BYTES)
            startup = time.perf_counter() - t0
            try:
                ray_job = Job(tuple(paths), Path(tmp) / "ray", pre, shard_size=args.shard_size,
                              batch_size=best_batch)
                t0 = time.perf_counter()
                ray_run = run_ray(ray_job, str(model_dir), progress=False)["run"]
                rate = len(paths) / (time.perf_counter() - t0)
            finally:
                ray.shutdown()
            same = all((job.out / p.name).read_bytes() == p.read_bytes() for p in sorted(ray_job.out.iterdir())
                       if p.is_file())
            result["ray"] = {"images_per_s": round(rate, 2), "over_ceiling": round(rate / ceiling, 3),
                             "cluster_start_s": round(startup, 2), "same_bytes_as_local": same} | steady(
                ray_run, ceiling)
    for name in ("local", "ray"):
        if name in result:  # a million images: the start-up once, then the rate after the first shard
            r = result[name]
            rate = r["images_per_s_after_first_shard"] or r["images_per_s"]
            r["hours_per_million"] = round((r["first_shard_s"] + 1e6 / rate) / 3600, 1)
    if "ray" in result:
        result["ray"]["hours_per_million_by_machines"] = {
            n: round(result["ray"]["hours_per_million"] / n, 1) for n in (1, 2, 4, 8)}
    print(json.dumps(result, indent=1))
    write_result(result, "bulk", args.quick, args.out)
    return result


if __name__ == "__main__":
    main()
