"""One shard of a pre-tokenizing job, and the local engine that runs them all.

The input files are sorted and cut into shards of `shard_size` files: shard k holds files k*S .. (k+1)*S-1, so a
shard's content depends only on the input list, never on the engine or its workers. `tokenize_shard` decodes its
files with the server's conversion (gqtok.photos.to_rgb: EXIF, bit depth, alpha), makes each file's views
(Preprocess) and tokenizes them in batches (tokens do not depend on the batch); `write_shard` writes
shard-k.npy (under a temporary name, then renamed) and then shard-k.jsonl, whose presence marks the shard done.
`run_local` skips the done shards (resume: a shard cut off mid-way has no .jsonl and is redone), runs the rest,
then `finish` writes index.jsonl and meta.json. The Ray engine (ray_engine.py) calls the same functions.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import tarfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from gqtok import __version__
from gqtok.bulk.preprocess import Preprocess
from gqtok.core.layout import SEQUENCE_ORDER
from gqtok.core.shards import INDEX, META, describe, made_by, same_model, shard_name, token_dtype
from gqtok.photos import IMAGE_SUFFIXES, displayed_size, list_images, to_rgb

DEFAULT_SHARD_SIZE = 1024  # files per shard
DEFAULT_MAX_PIXELS = 64 * 2**20  # larger files are recorded as errors, not decoded (memory)


@dataclass(frozen=True)
class Job:
    """What a tokenizing job is: its inputs, preprocessing and output folder (the same for every engine)."""
    paths: tuple[str, ...]
    out: Path
    preprocess: Preprocess
    shard_size: int = DEFAULT_SHARD_SIZE
    batch_size: int = 16
    alpha: str = "composite"
    max_pixels: int = DEFAULT_MAX_PIXELS

    @property
    def shards(self) -> int:
        return (len(self.paths) + self.shard_size - 1) // self.shard_size

    def shard_paths(self, k: int) -> tuple[str, ...]:
        return self.paths[k * self.shard_size:(k + 1) * self.shard_size]

    def done(self, k: int) -> bool:
        return (self.out / f"{shard_name(k)}.jsonl").is_file() and (self.out / f"{shard_name(k)}.npy").is_file()


TAR_MEMBER = "::"  # "shard-000.tar::photos/0001.jpg": a member of a tar archive (WebDataset shards)


def list_inputs(inputs: list[str | Path]) -> tuple[str, ...]:
    """Folders (searched recursively), text files listing paths, and tar archives (WebDataset-style shards: their
    image members, as ARCHIVE::MEMBER) -> every image, sorted, without repeats."""
    paths = set()
    for spec in map(Path, inputs):
        if spec.is_file() and spec.suffix == ".tar":
            with tarfile.open(spec) as tar:
                paths |= {f"{spec}{TAR_MEMBER}{m.name}" for m in tar.getmembers()
                          if m.isfile() and Path(m.name).suffix.lower() in IMAGE_SUFFIXES}
        else:
            paths |= {str(p) for p in list_images(spec)}
    if not paths:
        raise ValueError(f"no images found in {', '.join(map(str, inputs))}")
    return tuple(sorted(paths))


READ_TRIES = 3  # reads of a file that fail with an OSError (missing for a moment, a network share's hiccup)
READ_RETRY_S = 0.5  # the first wait between tries; doubled each time


class ReadFailed(OSError):
    """A file that could not be read after READ_TRIES: the shard fails (and a rerun tries it again); it is never
    recorded as a file that failed for good, which only a file read whole but not decodable is."""


def read_bytes(path: str, archives: dict) -> bytes:
    """A file's bytes, or an ARCHIVE::MEMBER's (each archive opened once, in `archives`, and read member by member:
    a shard's members are never all in memory), retried on OSError; ReadFailed when every try failed."""
    for attempt in range(READ_TRIES):
        try:
            if TAR_MEMBER not in path:
                return Path(path).read_bytes()
            archive, member = path.split(TAR_MEMBER, 1)
            if archive not in archives:
                archives[archive] = tarfile.open(archive)
            return archives[archive].extractfile(member).read()
        except (OSError, tarfile.TarError, KeyError) as e:
            broken = archives.pop(path.split(TAR_MEMBER, 1)[0], None)  # reopened on the next try
            if broken is not None:
                broken.close()
            if attempt == READ_TRIES - 1:
                raise ReadFailed(f"{path} could not be read after {READ_TRIES} tries: {type(e).__name__}: {e}") from e
            time.sleep(READ_RETRY_S * 2**attempt)
    raise AssertionError("unreachable")


def read_files(paths):
    """(path, bytes) of each path in order, read one at a time (read_bytes); a file that could not be read comes
    as (path, ReadFailed), raised where it is consumed, so that the files before it are tokenized first."""
    archives = {}
    try:
        for path in paths:
            try:
                yield path, read_bytes(path, archives)
            except ReadFailed as e:
                yield path, e
    finally:
        for tar in archives.values():
            tar.close()


def expected_grid(job: Job, manifest) -> tuple[int, int, int]:
    """(t, h, w) of every row: from the crop size, or (size=0) from the first input file that decodes."""
    f, t = manifest.downsample, manifest.tokens_per_position
    if job.preprocess.size:
        return (t, *job.preprocess.budget_grid(f, t))
    for path, data in read_files(job.paths):
        views, _ = file_views(path, job, f, data, t)
        if views:
            return (t, views[0].shape[0] // f, views[0].shape[1] // f)
    raise ValueError("none of the input files decodes")


def file_views(path: str, job: Job, f: int, data: bytes | ReadFailed | None = None,
               t: int = 1) -> tuple[list[np.ndarray], dict]:
    """A file's views and its index entry, from its bytes (default: read here, read_bytes); a file that was read
    but cannot be used gets status "error" and its reason. ReadFailed passes through: not the file's fault."""
    entry: dict = {"path": path}
    data = read_bytes(path, {}) if data is None else data
    if isinstance(data, ReadFailed):
        raise data
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > job.max_pixels:  # from the header, before decoding
                raise ValueError(f"{w}x{h} is more than max_pixels={job.max_pixels}")
            original_size = displayed_size(im)  # before prepare_decoding, which may scale the decoding down
            job.preprocess.prepare_decoding(im)
            img = to_rgb(im, job.alpha, path)
        entry["original_size"] = list(original_size)
        views = job.preprocess.views(img, path, f, t)
    except UnidentifiedImageError:  # its message names a buffer's address: not the same bytes on a rerun
        return [], entry | {"status": "error", "rows": 0,
                            "error": "UnidentifiedImageError: not an image format Pillow can read"}
    except Exception as e:  # truncated, too large, transparent with alpha=refuse, ...
        return [], entry | {"status": "error", "rows": 0, "error": f"{type(e).__name__}: {e}"}
    return views, entry | {"status": "ok", "rows": len(views)}


def decoded_files(job: Job, shards: list[int], f: int, pool: ThreadPoolExecutor | None = None,
                  ahead: int = 0, t: int = 1):
    """(views, index entry) of every file of `shards`, in order. With a pool, up to `ahead` files are decoded
    ahead of the consumer, across shard boundaries: the runtime does not wait for decoding at a shard's start,
    and memory holds `ahead` files' views, not a shard's (ten views of 1024 files are 2 GB at 256x256)."""
    def files():
        yield from read_files(path for k in shards for path in job.shard_paths(k))

    if pool is None:
        for path, data in files():
            yield file_views(path, job, f, data, t)
        return
    pending = deque()
    for path, data in files():
        pending.append(pool.submit(file_views, path, job, f, data, t))
        if len(pending) > ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def tokenize_shard(job: Job, k: int, runtime, grid: tuple[int, int, int], decoded=None) -> tuple[np.ndarray, list[dict]]:
    """Shard k -> (tokens [rows, t, h, w] in the shards' dtype, one index entry per file). decoded: a
    decoded_files stream whose next files are shard k's (default: the shard decoded here, file after file)."""
    f, t = runtime.manifest.downsample, runtime.manifest.tokens_per_position
    decoded = itertools.islice(decoded if decoded is not None else decoded_files(job, [k], f, t=t),
                               len(job.shard_paths(k)))
    entries, pending, rows = [], [], []
    size = (grid[1] * f, grid[2] * f)

    def flush():
        if pending:
            rows.append(runtime.tokenize(np.stack(pending)))
            pending.clear()

    for views, entry in decoded:
        if entry["status"] == "ok" and views[0].shape[:2] != size:
            entry = entry | {"status": "error", "rows": 0, "error": f"its grid {views[0].shape[0] // f}x"
                             f"{views[0].shape[1] // f} differs from the dataset's {grid[1]}x{grid[2]} "
                             "(give a --size to resize and crop every file alike)"}
            views = []
        entries.append(entry)
        for view in views:
            pending.append(view)
            if len(pending) == job.batch_size:
                flush()
    flush()
    dtype = token_dtype(runtime.manifest.num_codes)
    tokens = np.concatenate(rows).astype(dtype) if rows else np.zeros((0, *grid), dtype)
    return tokens, entries


def write_atomically(path: Path, data: bytes | str) -> None:
    """`data` into `path` through a temporary name, on disk (fsync) before the rename and the rename on disk
    after it: a crash or power cut leaves the old file or the new one, never a part."""
    tmp = path.with_name(f".{path.name}.part")
    with open(tmp, "wb") as fh:
        fh.write(data.encode() if isinstance(data, str) else data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def write_shard(job: Job, k: int, tokens: np.ndarray, entries: list[dict]) -> None:
    """shard-k.npy, then shard-k.jsonl (the mark of a finished shard), each written atomically."""
    name = shard_name(k)
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(tokens), allow_pickle=False)
    write_atomically(job.out / f"{name}.npy", buf.getvalue())
    write_atomically(job.out / f"{name}.jsonl",
                     "".join(json.dumps(e | {"shard": name}, sort_keys=True) + "\n" for e in entries))


def finish(job: Job, manifest, grid: tuple[int, int, int], runtime_record: dict) -> dict:
    """index.jsonl (every shard's entries, in order) and meta.json, from the finished shards."""
    shards, lines, counts = [], [], {"files": 0, "ok": 0, "failed": 0, "rows": 0}
    for k in range(job.shards):
        name = shard_name(k)
        entries = [json.loads(line) for line in (job.out / f"{name}.jsonl").read_text().splitlines()]
        rows = sum(e["rows"] for e in entries)
        shards.append({"name": name, "rows": rows, "files": len(entries)})
        lines += entries
        counts["files"] += len(entries)
        counts["ok"] += sum(e["status"] == "ok" for e in entries)
        counts["rows"] += rows
    counts["failed"] = counts["files"] - counts["ok"]
    write_atomically(job.out / INDEX, "".join(json.dumps(e, sort_keys=True) + "\n" for e in lines))
    meta = {
        "gqtok_version": __version__,
        "model": made_by(manifest), "runtime": runtime_record,
        "num_codes": manifest.num_codes, "tokens_per_position": manifest.tokens_per_position,
        "downsample": manifest.downsample, "grid": list(grid), "dtype": token_dtype(manifest.num_codes).name,
        "token_order": SEQUENCE_ORDER, "preprocess": job.preprocess.record(), "alpha": job.alpha,
        "shard_size": job.shard_size, "counts": counts, "shards": shards,
    }
    write_atomically(job.out / META, json.dumps(meta, indent=1) + "\n")
    return meta


def job_record(job: Job, manifest) -> dict:
    """What identifies a job (job.json): a digest of the full list of inputs in order (a file added, removed or
    renamed is another job), the options that shape its shards, and the model."""
    inputs = hashlib.sha256("\n".join(map(str, job.paths)).encode()).hexdigest()
    return {"inputs": len(job.paths), "inputs_sha256": inputs, "preprocess": job.preprocess.record(),
            "shard_size": job.shard_size, "alpha": job.alpha, "model": made_by(manifest)}


def prepare(job: Job, manifest) -> tuple[int, int, int]:
    """Make the output folder; refuse one holding another job's shards; the grid of every row."""
    job.out.mkdir(parents=True, exist_ok=True)
    plan = job.out / "job.json"
    record = job_record(job, manifest)
    if plan.is_file():
        before = json.loads(plan.read_text())
        if "model" in before and isinstance(before["model"], dict) and not same_model(before["model"], manifest):
            raise ValueError(f"{job.out} holds shards tokenized by {describe(before['model'])}; this run uses "
                             f"{describe(made_by(manifest))}: use a new --out folder")
        differ = [k for k in record if before.get(k) != record[k]]
        if differ:
            raise ValueError(f"{job.out} holds shards of another job ({', '.join(differ)} differ); use a new --out "
                             "folder, or the same inputs and options to resume it")
    write_atomically(plan, json.dumps(record, indent=1) + "\n")
    (job.out / META).unlink(missing_ok=True)  # meta.json marks a finished directory: not until finish()
    return expected_grid(job, manifest)


def run_local(job: Job, runtime, decode_workers: int = 1, progress: bool = True) -> dict:
    """Every shard not done yet, in this process: a decode pool feeding the runtime."""
    grid = prepare(job, runtime.manifest)
    todo = [k for k in range(job.shards) if not job.done(k)]
    bar = progress_bar(sum(len(job.shard_paths(k)) for k in todo), progress)
    clock = RunClock()
    with ThreadPoolExecutor(decode_workers, thread_name_prefix="decode") as pool:
        for files in run_shards(job, todo, runtime, grid, pool):
            bar.update(files)
            clock.shard_done(files)
    bar.close()
    meta = finish(job, runtime.manifest, grid, runtime_record(runtime))
    meta["run"] = {"shards_run": len(todo), "shards_skipped": job.shards - len(todo)} | clock.figures()
    return meta


def runtime_record(runtime) -> dict:
    """Provenance of the tokens (meta.json's "runtime"): how they were selected, on what, by which runtime."""
    import onnxruntime

    return {"onnxruntime": onnxruntime.__version__, "provider": runtime.provider, "selector": runtime.selector}


class RunClock:
    """When a run's shards finished: its seconds, the seconds to its first shard (start-up: runtimes, actors, the
    first decodes) and the files/s after that (the rate a long run approaches)."""

    def __init__(self):
        self.start, self.first, self.first_files, self.files = time.perf_counter(), None, 0, 0

    def shard_done(self, files: int) -> None:
        self.files += files
        if self.first is None:
            self.first, self.first_files = time.perf_counter(), files

    def figures(self) -> dict:
        end = time.perf_counter()
        steady = (self.files - self.first_files) / (end - self.first) if self.first and end > self.first else None
        return {"seconds": round(end - self.start, 3),
                "first_shard_s": None if self.first is None else round(self.first - self.start, 3),
                "files_per_s_after_first_shard": None if steady is None else round(steady, 2)}


def run_shards(job: Job, shards: list[int], runtime, grid: tuple[int, int, int], pool: ThreadPoolExecutor):
    """Tokenize and write `shards` in order, the pool decoding ahead across them; yields each shard's file count.
    Both engines run their shards through here (the local one all of them, a Ray actor the ones it is given)."""
    m = runtime.manifest
    stream = decoded_files(job, shards, m.downsample, pool, decode_ahead(job), m.tokens_per_position)
    for k in shards:
        tokens, entries = tokenize_shard(job, k, runtime, grid, stream)
        write_shard(job, k, tokens, entries)
        yield len(entries)


def decode_ahead(job: Job) -> int:
    """Files decoded ahead of the runtime: two batches' worth, so a batch is always ready when the last ends."""
    return 2 * max(1, job.batch_size // job.preprocess.views_per_file)


def progress_bar(total: int, enabled: bool):
    """Files done, files/s and ETA (tqdm, in the serve extra)."""
    from tqdm import tqdm

    return tqdm(total=total, unit="file", desc="tokenize", smoothing=0.05, disable=not enabled)
