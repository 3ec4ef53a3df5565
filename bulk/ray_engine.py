"""The Ray engine: the local engine's shards, run by a pool of Ray Data actors (pip install 'gqtok[ray]').

    gqtok tokenize DATA --out TOKENS --engine ray                      # a local Ray cluster on this machine
    gqtok tokenize DATA --out TOKENS --engine ray --address HOST:6379  # join a running cluster

The shards still to do become a Ray dataset of shard numbers; `map_batches` runs them on an actor pool, each
actor holding one TokenizerRuntime (loaded once) and running its shards through the same run_shards as the local
engine, so the shards are byte-identical to its. On a cluster, every node needs the model directory at the same
path and the output folder on a shared filesystem (every actor writes its shards there); the driver writes
index.jsonl and meta.json when all are done.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

from gqtok.bulk.shards import Job, RunClock, finish, prepare, progress_bar, run_shards, runtime_record
from gqtok.core.artifact import load_artifact
from gqtok.core.models import find_model

LOCAL_OBJECT_STORE_BYTES = 256 * 2**20  # a local cluster moves shard numbers only: keep its object store small


class ShardWorker:
    """A Ray actor: one runtime, any number of shards."""

    def __init__(self, job: Job, model_dir: str, grid: tuple[int, int, int], device: str, threads: int,
                 decode_workers: int = 1):
        from gqtok.service.runtime import TokenizerRuntime

        self.job, self.grid = job, grid
        self.runtime = TokenizerRuntime(load_artifact(model_dir), device=device, threads=threads)
        self.pool = ThreadPoolExecutor(decode_workers, thread_name_prefix="decode")  # as the local engine's

    def __call__(self, batch: dict) -> dict:
        shards = [int(k) for k in batch["shard"]]
        return {"shard": batch["shard"], "files": list(run_shards(self.job, shards, self.runtime, self.grid, self.pool)),
                "runtime": [json.dumps(runtime_record(self.runtime), sort_keys=True)] * len(shards)}


def run_ray(job: Job, model: str, address: str | None = None, workers: int = 0, device: str = "cpu",
            threads: int = 0, decode_workers: int = 1, progress: bool = True) -> dict:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    model_dir = str(find_model(model).resolve())
    manifest = load_artifact(model_dir).manifest
    grid = prepare(job, manifest)
    todo = [k for k in range(job.shards) if not job.done(k)]
    records = set()  # the runtime records of the actors (one, unless the cluster's nodes differ)
    clock = RunClock()  # from here: a cluster it starts counts as start-up, as the actors do
    started = not ray.is_initialized()
    if started:
        kwargs = {} if address else {"object_store_memory": LOCAL_OBJECT_STORE_BYTES}
        ray.init(address=address, include_dashboard=False, log_to_driver=False, **kwargs)
    try:
        if todo:
            cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
            actors = workers or max(1, cpus // 2)
            per_actor = max(1, cpus // actors)
            ctx = ray.data.DataContext.get_current()
            ctx.enable_progress_bars = False
            bar = progress_bar(sum(len(job.shard_paths(k)) for k in todo), progress)
            shards = ray.data.from_items([{"shard": k} for k in todo], override_num_blocks=len(todo))
            done = shards.map_batches(ShardWorker, batch_size=1, concurrency=actors, num_cpus=per_actor,
                                      fn_constructor_kwargs={"job": job, "model_dir": model_dir, "grid": grid,
                                                             "device": device, "threads": threads or per_actor,
                                                             "decode_workers": decode_workers})
            for row in done.iter_rows():
                records.add(row["runtime"])
                bar.update(int(row["files"]))
                clock.shard_done(int(row["files"]))
            bar.close()
    finally:
        if started:
            ray.shutdown()
    runtime = [json.loads(r) for r in sorted(records)] or [{"provider": device, "selector": "exact"}]
    meta = finish(job, manifest, grid, runtime[0] if len(runtime) == 1 else {"actors": runtime})
    meta["run"] = {"shards_run": len(todo), "shards_skipped": job.shards - len(todo)} | clock.figures()
    return meta
