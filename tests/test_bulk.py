"""gqtok.bulk and gqtok.core.shards: pre-tokenizing a folder of real photos into shards, resuming, bad files,
and the Ray engine writing the same bytes as the local one."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gqtok.bulk.preprocess import Preprocess, resize_shorter
from gqtok.bulk.shards import Job, file_views, list_inputs, run_local
from gqtok.core.layout import grids_to_sequences
from gqtok.core.shards import TokenShards
from gqtok.photos import load_rgb, to_rgb
from gqtok.service.tokenizer import Tokenizer

pytestmark = pytest.mark.slow


def test_views_are_deterministic_per_file_and_the_right_size():
    img = np.random.default_rng(0).integers(0, 256, (90, 150, 3), dtype=np.uint8)
    assert resize_shorter(img, 64).shape == (64, 107, 3) and resize_shorter(img, 90) is img
    (center,) = Preprocess(size=64).views(img, "a.jpg", 8)
    assert np.array_equal(center, resize_shorter(img, 64)[:, 21:85])
    ten = Preprocess(size=64, crop="ten").views(img, "a.jpg", 8)
    assert len(ten) == 10 and all(v.shape == (64, 64, 3) for v in ten)
    assert np.array_equal(ten[5], ten[0][:, ::-1])  # the mirror images follow the five crops
    rand = Preprocess(size=64, crop="random", flip=True, seed=3)
    assert np.array_equal(rand.views(img, "a.jpg", 8)[0], rand.views(img, "a.jpg", 8)[0])  # per file, not per call
    others = {rand.views(img, f"{i}.jpg", 8)[0].tobytes() for i in range(8)}
    assert len(others) > 1  # different files: different crops
    (padded,) = Preprocess(size=0, fit="pad").views(img[:85], "a.jpg", 8)
    assert padded.shape == (88, 152, 3)
    with pytest.raises(ValueError, match="multiple of the model's f=8"):
        Preprocess(size=60).views(img, "a.jpg", 8)
    with pytest.raises(ValueError, match="need a size"):
        Preprocess(size=0, crop="ten")


def test_a_token_budget_resizes_every_view_to_fit_it():
    img = np.random.default_rng(1).integers(0, 256, (90, 150, 3), dtype=np.uint8)
    pre = Preprocess(size=64, crop="ten", max_tokens=32)  # t=2: 16 positions, so 32x32 views, 4x4 grids
    views = pre.views(img, "a.jpg", 8, 2)
    assert len(views) == 10 and all(v.shape == (32, 32, 3) for v in views) and pre.budget_grid(8, 2) == (4, 4)
    (odd,) = Preprocess(size=0, max_tokens=20).views(img, "a.jpg", 8, 1)  # 3:5, padded to multiples of 8
    assert odd.shape[0] % 8 == 0 and odd.shape[1] % 8 == 0 and (odd.shape[0] // 8) * (odd.shape[1] // 8) <= 20
    with pytest.raises(ValueError, match="max_tokens must be"):
        Preprocess(max_tokens=-1)


def test_jpegs_decode_at_a_reduced_scale_close_to_a_full_decode(small_photos):
    """draft=True (the default) decodes a JPEG at the smallest DCT scale that still covers the resize: its views
    stay close to a full-size decode's; draft=False gives exactly the full decode's; the original size recorded
    is the file's, not the reduced decode's."""
    path = str(next(p for p in sorted(small_photos.iterdir()) if p.suffix == ".jpg"))
    full_size = load_rgb(Path(path)).shape[:2]
    assert min(full_size) >= 4 * 32  # a scale of 1/2 or less applies at size 32
    drafted, entry = file_views(path, Job((path,), Path("unused"), Preprocess(size=32)), 8)
    full, _ = file_views(path, Job((path,), Path("unused"), Preprocess(size=32, draft=False)), 8)
    assert np.array_equal(full[0], Preprocess(size=32).views(load_rgb(Path(path)), path, 8)[0])
    assert drafted[0].shape == full[0].shape == (32, 32, 3) and not np.array_equal(drafted[0], full[0])
    mse = np.mean((drafted[0].astype(float) - full[0].astype(float)) ** 2)
    assert 10 * np.log10(255**2 / mse) > 30
    assert entry["original_size"] == list(full_size)
    with Image.open(path) as im:  # PNG and the like, and size 0 (no resize), decode at full size
        Preprocess(size=0).prepare_decoding(im)
        assert im.size == (full_size[1], full_size[0]) and to_rgb(im).shape[:2] == full_size


def test_decoding_runs_ahead_across_shards_but_a_bounded_way(small_photos, monkeypatch):
    """decoded_files keeps at most `ahead` files decoded beyond what the runtime took (memory is bounded, not a
    shard's views), in the job's order across shard boundaries (the runtime never waits at a shard's start)."""
    from concurrent.futures import ThreadPoolExecutor

    import gqtok.bulk.shards as shards

    started, real = [], shards.file_views
    monkeypatch.setattr(shards, "file_views", lambda path, *a: (started.append(path), real(path, *a))[1])
    job = Job(list_inputs([small_photos]), Path("unused"), Preprocess(size=32), shard_size=5, batch_size=2)
    consumed = []
    with ThreadPoolExecutor(2) as pool:
        for views, entry in shards.decoded_files(job, [0, 1, 2], 8, pool, ahead=3):
            consumed.append(entry["path"])
            time.sleep(0.05)  # a slow runtime: the pool would run far ahead if nothing held it
            assert len(started) <= len(consumed) + 3, (len(started), len(consumed))
    assert consumed == list(job.paths) and sorted(started) == list(job.paths)


@pytest.fixture(scope="module")
def dataset(small_photos, tmp_path_factory) -> Path:
    """The small photo set plus three files that cannot be tokenized, listed in a text file."""
    bad = tmp_path_factory.mktemp("bad")
    (bad / "not_an_image.png").write_bytes(b"hello")
    good = next(p for p in sorted(small_photos.iterdir()))
    (bad / "truncated.jpg").write_bytes(good.read_bytes()[:2000])
    Image.new("RGB", (1200, 1000)).save(bad / "huge.png")
    listing = tmp_path_factory.mktemp("list") / "files.txt"
    listing.write_text("\n".join(str(p) for p in [*sorted(small_photos.iterdir()), *sorted(bad.iterdir())]) + "\n")
    return listing


def tokenize_cli(*args, **kw) -> dict:
    out = subprocess.run([sys.executable, "-m", "gqtok.cli", "tokenize", *map(str, args), "--quiet"],
                         capture_output=True, text=True, timeout=600, **kw)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def directory_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def local_tokens(dataset, tiny_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokens") / "local"
    summary = tokenize_cli(dataset, "--out", out, "--model", tiny_model, "--size", "64", "--shard-size", "4",
                           "--max-pixels", "1100000")
    assert summary["files"] == 18 and summary["ok"] == 15 and summary["failed"] == 3 and summary["shards"] == 5
    return out


def test_shards_hold_the_tokenizers_tokens_in_order(local_tokens, tiny_model, dataset):
    shards = TokenShards(local_tokens)
    tok = Tokenizer.load(str(tiny_model), device="cpu")
    shards.check_model(tok.manifest)
    assert len(shards) == 15 and shards.grid == (tok.manifest.tokens_per_position, 8, 8)
    assert shards.meta["dtype"] == "uint16" and shards.meta["counts"]["rows"] == 15
    pre = Preprocess(size=64)
    good = [p for p in dataset.read_text().split() if "bad" not in Path(p).parent.name]
    for i in (0, 6, 14):
        path = good[i]
        assert shards.source(i)["path"] == path
        with Image.open(path) as im:  # the engines' decoding: a JPEG at the smallest DCT scale covering size 64
            pre.prepare_decoding(im)
            view = pre.views(to_rgb(im), path, 8)[0]
        ids = tok.encode(view)
        assert np.array_equal(shards.grids(i, i + 1), ids.astype(np.uint16))
        assert np.array_equal(shards[i], grids_to_sequences(ids)[0])  # the canonical sequence order
    assert np.array_equal(shards.grids(), np.stack([shards.grids(i, i + 1)[0] for i in range(15)]))


def test_the_cli_writes_budgeted_grids(dataset, tiny_model, tmp_path):
    summary = tokenize_cli(dataset, "--out", tmp_path / "budget", "--model", tiny_model, "--size", "64",
                           "--max-tokens", "32", "--shard-size", "8", "--max-pixels", "1100000")
    shards = TokenShards(tmp_path / "budget")
    assert summary["ok"] == 15 and shards.grid == (2, 4, 4) and shards.meta["preprocess"]["max_tokens"] == 32


def test_bad_files_are_recorded_with_their_reason(local_tokens):
    entries = [json.loads(line) for line in (local_tokens / "index.jsonl").read_text().splitlines()]
    errors = {Path(e["path"]).name: e["error"] for e in entries if e["status"] == "error"}
    assert set(errors) == {"not_an_image.png", "truncated.jpg", "huge.png"}
    assert "UnidentifiedImageError" in errors["not_an_image.png"] and "max_pixels" in errors["huge.png"]
    assert "OSError" in errors["truncated.jpg"]


def test_a_run_killed_mid_way_resumes_to_the_same_bytes(local_tokens, dataset, tiny_model, tmp_path):
    out = tmp_path / "resumed"
    args = [sys.executable, "-m", "gqtok.cli", "tokenize", str(dataset), "--out", str(out), "--model",
            str(tiny_model), "--size", "64", "--shard-size", "4", "--max-pixels", "1100000", "--quiet"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (out / "shard-00001.jsonl").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "meta.json").exists()  # not finished
    (out / "shard-00003.npy").write_bytes(b"half a shard")  # as a kill between the rename and the .jsonl leaves it
    summary = tokenize_cli(dataset, "--out", out, "--model", tiny_model, "--size", "64", "--shard-size", "4",
                           "--max-pixels", "1100000")
    assert summary["shards_skipped"] >= 2 and summary["shards_run"] + summary["shards_skipped"] == 5
    assert directory_bytes(out) == directory_bytes(local_tokens)
    bad = subprocess.run([sys.executable, "-m", "gqtok.cli", "tokenize", str(dataset), "--out", str(out), "--model",
                          str(tiny_model), "--size", "128", "--quiet"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "holds shards of another job" in bad.stderr


def test_the_ray_engine_writes_the_same_bytes(local_tokens, dataset, tiny_model, tmp_path):
    pytest.importorskip("ray")
    out = tmp_path / "ray"
    summary = tokenize_cli(dataset, "--out", out, "--model", tiny_model, "--size", "64", "--shard-size", "4",
                           "--max-pixels", "1100000", "--engine", "ray", "--workers", "2")
    assert summary["rows"] == 15
    assert directory_bytes(out) == directory_bytes(local_tokens)


def test_detokenize_writes_the_decoded_rows(local_tokens, tiny_model, tmp_path):
    out = subprocess.run([sys.executable, "-m", "gqtok.cli", "detokenize", str(local_tokens), "--out",
                          str(tmp_path / "images"), "--limit", "3", "--model", str(tiny_model)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    tok = Tokenizer.load(str(tiny_model), device="cpu")
    images = tok.decode(TokenShards(local_tokens).grids(0, 3).astype(np.int64))
    for i in range(3):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "images" / f"row-{i:06d}.png")), images[i])


def test_local_engine_in_process_matches_and_skips_finished_shards(local_tokens, dataset, tiny_model, tmp_path):
    tok = Tokenizer.load(str(tiny_model), device="cpu")
    job = Job(list_inputs([dataset]), tmp_path / "inproc", Preprocess(size=64), shard_size=4, batch_size=3,
              max_pixels=1_100_000)
    first = run_local(job, tok.runtime, decode_workers=2, progress=False)
    assert first["run"]["shards_run"] == 5
    assert 0 < first["run"]["first_shard_s"] <= first["run"]["seconds"] and first["run"]["files_per_s_after_first_shard"] > 0
    assert directory_bytes(job.out) == directory_bytes(local_tokens)  # batch size and decode threads change nothing
    again = run_local(job, tok.runtime, progress=False)
    assert again["run"] == {"shards_run": 0, "shards_skipped": 5, "seconds": again["run"]["seconds"],
                            "first_shard_s": None, "files_per_s_after_first_shard": None}


def test_tar_shards_give_the_folders_tokens(small_photos, tiny_model, tmp_path):
    """WebDataset-style input: the image members of tar archives, read once per shard, as ARCHIVE::MEMBER."""
    import tarfile

    photos = sorted(small_photos.iterdir())[:6]
    archive = tmp_path / "shard-000.tar"
    with tarfile.open(archive, "w") as tar:
        for i, p in enumerate(photos):
            tar.add(p.resolve(), arcname=f"{i:04d}.jpg")
            (tmp_path / f"{i:04d}.cls").write_text("0")
            tar.add(tmp_path / f"{i:04d}.cls", arcname=f"{i:04d}.cls")  # a label beside it: not an image
    tok = Tokenizer.load(str(tiny_model), device="cpu")
    from_tar = Job(list_inputs([archive]), tmp_path / "tar", Preprocess(size=64), shard_size=4)
    assert from_tar.paths[0] == f"{archive}::0000.jpg" and len(from_tar.paths) == 6
    run_local(from_tar, tok.runtime, progress=False)
    shards = TokenShards(from_tar.out)
    from_folder = Job(tuple(str(p) for p in photos), tmp_path / "folder", Preprocess(size=64), shard_size=4)
    run_local(from_folder, tok.runtime, progress=False)
    assert np.array_equal(shards.grids(), TokenShards(from_folder.out).grids())
    assert shards.source(5)["path"] == f"{archive}::0005.jpg"


def test_a_file_missing_for_a_moment_fails_its_shard_and_a_rerun_tokenizes_it(small_photos, tiny_model, tmp_path,
                                                                               monkeypatch):
    """A read error is retried, then fails the shard (not recorded as done, not as a bad file); a rerun retries
    the shard and gets the file; a file briefly missing during the retries is read."""
    import shutil
    import threading

    import gqtok.bulk.shards as shards

    monkeypatch.setattr(shards, "READ_RETRY_S", 0.05)
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in sorted(small_photos.iterdir())[:6]:
        shutil.copy(p, folder / p.name)
    job = Job(list_inputs([folder]), tmp_path / "tokens", Preprocess(size=64), shard_size=2)
    tok = Tokenizer.load(str(tiny_model), device="cpu")
    moved = Path(job.paths[3])
    moved.rename(tmp_path / "away")
    with pytest.raises(shards.ReadFailed, match=f"{moved.name} could not be read after 3 tries"):
        run_local(job, tok.runtime, progress=False)
    assert job.done(0) and not job.done(1) and not (job.out / "meta.json").exists()
    # back a moment after the first try: the retries find it
    threading.Timer(0.02, lambda: (tmp_path / "away").rename(moved)).start()
    meta = run_local(job, tok.runtime, progress=False)
    assert meta["counts"] == {"files": 6, "ok": 6, "rows": 6, "failed": 0}
    assert meta["run"]["shards_skipped"] == 1
    assert meta["runtime"] == {"onnxruntime": meta["runtime"]["onnxruntime"], "provider": "CPUExecutionProvider",
                               "selector": "exact"}


def test_a_resume_with_other_inputs_or_another_model_is_refused(small_photos, tiny_model, tiny_model_reexport,
                                                                tmp_path):
    """One input deleted and another added keeps the count (and could keep the first and last path): still
    another job. Another export of the same model id and version: refused, both digests named."""
    import shutil

    from gqtok.core.manifest import Manifest

    folder = tmp_path / "photos"
    folder.mkdir()
    photos = sorted(small_photos.iterdir())[:5]
    for p in photos:
        shutil.copy(p, folder / p.name)
    tok = Tokenizer.load(str(tiny_model), device="cpu")
    job = Job(list_inputs([folder]), tmp_path / "tokens", Preprocess(size=64), shard_size=2)
    run_local(job, tok.runtime, progress=False)
    (folder / photos[2].name).unlink()
    shutil.copy(photos[2], folder / (photos[2].stem + "-copy" + photos[2].suffix))  # same count, first and last
    changed = Job(list_inputs([folder]), job.out, Preprocess(size=64), shard_size=2)
    assert (changed.paths[0], changed.paths[-1], len(changed.paths)) == (job.paths[0], job.paths[-1], len(job.paths))
    with pytest.raises(ValueError, match="inputs_sha256 differ"):
        run_local(changed, tok.runtime, progress=False)
    other = Tokenizer.load(str(tiny_model_reexport), device="cpu")
    ours, theirs = Manifest.read(tiny_model), Manifest.read(tiny_model_reexport)
    with pytest.raises(ValueError, match=f"tokenized by tiny {ours.model_version} \\(model digest "
                                         f"{ours.model_digest[:12]}\\); this run uses tiny {theirs.model_version} "
                                         f"\\(model digest {theirs.model_digest[:12]}\\)"):
        run_local(job, other.runtime, progress=False)
    with pytest.raises(ValueError, match="tokenize the data again"):
        TokenShards(job.out).check_model(theirs)
    TokenShards(job.out).check_model(ours)
