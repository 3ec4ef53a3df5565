"""Real training on real photos: the tiny preset end to end, resume, and data-parallel agreement."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from gqtok.training.train import train

pytestmark = pytest.mark.slow


def run_cli(*args, **kw):
    proc = subprocess.run([sys.executable, "-m", "gqtok.cli", *args], capture_output=True, text=True, **kw)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_tiny_train_then_eval_writes_every_field(small_photos, tmp_path):
    run = tmp_path / "run"
    run_cli("train", "--preset", "tiny", "--data", str(small_photos), "--out", str(run), "--steps", "40", "--quiet")
    assert {"config.json", "model.safetensors", "trainer.pt", "log.jsonl"} <= {p.name for p in run.iterdir()}
    assert (run / "model.safetensors").stat().st_mode & 0o044 == 0o044  # not safetensors' own 0600
    assert (run / "samples").is_dir() and any((run / "samples").glob("*.png"))
    out = tmp_path / "eval.json"
    run_cli("eval", str(run), "--data", str(small_photos), "--json", str(out), "--size", "192", "256", "--quiet")
    r = json.loads(out.read_text())

    assert r["images"] == 3 and r["image_size"] == [192, 256]
    for part in ("continuous", "quantized"):
        assert 10 < r[part]["psnr"] < 60
        assert 0 < r[part]["ssim"] <= 1 and 0 < r[part]["ms_ssim"] <= 1
    # tiny: f=8, C=8, d=4 -> 2 tokens per position of 8 bits
    assert r["rate"] == {"tokens_per_image": 2 * 24 * 32, "tokens_per_256x256": 2048, "bits_per_token": 8,
                         "bpp": 2 * 24 * 32 * 8 / (192 * 256)}
    kl = r["kl_bits_per_token"]
    assert kl["target"] == 8 and kl["band"] == 0.5
    assert kl["min"] <= kl["p5"] <= kl["p50"] <= kl["p95"] <= kl["max"] and 0 <= kl["fraction_in_band"] <= 1
    cb = r["codebook"]
    assert cb["size"] == 256 and 0 < cb["used_fraction"] <= 1 and 1 <= cb["perplexity"] <= 256
    assert cb["tokens_counted"] == 3 * 2 * 24 * 32
    err = r["quantization_error_in_sigmas"]
    assert 0 <= err["p50"] <= err["p95"] <= err["p99"] <= err["max"] and 0 <= err["fraction_below_1"] <= 1
    assert len(r["per_image"]) == 3
    grid = Image.open(out.with_suffix(".png"))
    assert grid.size == (3 * 256 // 2, 3 * 192 // 2)  # original | mean | GQ, three rows, half size


def test_resume_continues_exactly(small_photos, tmp_path):
    """20 + 20 resumed steps give the same weights and TDC scalars as 40 straight steps."""
    kw = dict(data=small_photos, preset="tiny", progress=False)
    train(tmp_path / "straight", overrides={"steps": 40, "image_every": 0}, **kw)
    train(tmp_path / "split", overrides={"steps": 20, "image_every": 0}, **kw)
    mid, mid_cpu = (json.loads((tmp_path / "split" / "config.json").read_text())[k] for k in ("tdc", "cpu_seconds"))
    train(tmp_path / "split", overrides={"steps": 40}, resume=True, **kw)

    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "split" / "model.safetensors"))
    assert a.keys() == b.keys() and {"tdc.lam", "tdc.lam_max", "tdc.lam_min"} <= a.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the scalars moved on from where the first half left them, not from their initial values
    assert b["tdc.lam"].item() != mid["lam"] and json.loads((tmp_path / "split" / "config.json").read_text())["step"] == 40
    # CPU time adds up across the resume: the second half's log lines start from the first half's total
    rows = [json.loads(line) for line in (tmp_path / "split" / "log.jsonl").read_text().splitlines()]
    after = [r["cpu_s"] for r in rows if r["step"] > 20]
    assert after and min(after) >= mid_cpu > 0 and [r["cpu_s"] for r in rows] == sorted(r["cpu_s"] for r in rows)


def test_stop_at_pauses_a_schedule_that_a_resume_finishes(small_photos, tmp_path):
    """stop_at ends a run early without shortening its learning-rate schedule: a cosine run stopped at step 20 of
    40 and resumed gives the 40 straight steps' weights (a schedule of 20 steps would not)."""
    kw = dict(data=small_photos, preset="tiny", progress=False)
    cosine = {"steps": 40, "image_every": 0, "lr_schedule": "cosine", "warmup_steps": 0}
    train(tmp_path / "straight", overrides=cosine, **kw)
    train(tmp_path / "stopped", overrides={**cosine, "stop_at": 20}, **kw)
    assert json.loads((tmp_path / "stopped" / "config.json").read_text())["step"] == 20
    train(tmp_path / "stopped", overrides={"stop_at": 0}, resume=True, **kw)
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "stopped" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_model_changes_and_overwrites(small_photos, tmp_path):
    train(tmp_path / "r", small_photos, "tiny", {"steps": 2}, progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        train(tmp_path / "r", small_photos, "tiny", {"steps": 2}, progress=False)
    with pytest.raises(ValueError, match="model"):
        train(tmp_path / "r", small_photos, "tiny", {"steps": 4, "latent_channels": 4}, resume=True, progress=False)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_ranks_agree(small_photos, tmp_path):
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "gqtok.cli", "train", "--preset", "tiny", "--data", str(small_photos),
           "--out", str(run), "--steps", "12", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["world_size"] == 2 and cfg["step"] == 12 and len(cfg["ranks"]) == 2
    r0, r1 = cfg["ranks"]
    assert r0 == r1  # same TDC scalars and the same weights on both ranks
    assert r0["lam"] != pytest.approx(1e-4)  # and the scalars did move


def _stats_worker(rank, port, out):
    import torch.distributed as dist

    from gqtok.training.tdc import TDC

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    local = torch.tensor([[1.0, 2.0]]) if rank == 0 else torch.tensor([[3.0, 10.0], [4.0, 4.0]])
    out[rank] = TDC.statistics(local)
    dist.destroy_process_group()


def test_kl_statistics_are_all_reduced():
    import torch.multiprocessing as mp

    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_stats_worker, args=(_free_port(), out), nprocs=2)
    expected = {"mean": np.mean([1, 2, 3, 10, 4, 4]), "max": 10.0, "min": 1.0}
    assert out[0] == pytest.approx(expected) and out[1] == pytest.approx(expected)


def test_sigterm_checkpoints_and_exits(small_photos, tmp_path):
    import signal
    import time

    run = tmp_path / "sig"
    proc = subprocess.Popen([sys.executable, "-m", "gqtok.cli", "train", "--preset", "tiny", "--data", str(small_photos),
                             "--out", str(run), "--steps", "1000000", "--quiet"], stderr=subprocess.PIPE, text=True)
    log = run / "log.jsonl"
    deadline = time.monotonic() + 120
    while not (log.exists() and log.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0, proc.stderr.read()[-2000:]
    step = json.loads((run / "config.json").read_text())["step"]
    assert step >= 10 and torch.load(run / "trainer.pt", weights_only=False)["step"] == step


def test_perceptual_term_trains(small_photos, tmp_path):
    """--perceptual-weight adds the EfficientNet-Lite0 deep-feature distance to the loss."""
    base = train(tmp_path / "a", small_photos, "tiny", {"steps": 2, "crop": 64}, progress=False)
    with_p = train(tmp_path / "b", small_photos, "tiny", {"steps": 2, "crop": 64, "perceptual_weight": 1.0},
                   progress=False)
    assert with_p["loss"] > with_p["recon"] and np.isfinite(with_p["loss"])
    assert with_p["loss"] != pytest.approx(base["loss"])


def test_several_folders_share_the_crops_by_weight(small_photos, tmp_path):
    """Two folders at weights 3:1 give about 3/4 and 1/4 of the crops, whatever their numbers of photos."""
    from gqtok.training.data import RandomCrops, parse_source, training_photos

    few = tmp_path / "few"
    few.mkdir()
    paths = sorted(small_photos.glob("*.jpg"))
    for p in paths[:2]:
        (few / f"other-{p.name}").symlink_to(p.resolve())
    assert parse_source(f"{few}:3") == (few, 3.0) and parse_source(str(few)) == (few, 1.0)
    with pytest.raises(ValueError, match="must be positive"):
        parse_source(f"{few}:0")
    photos, weights = training_photos([f"{few}:3", str(small_photos)])
    assert len(photos) == 2 + 12 and weights is not None
    assert weights[:2].sum() == pytest.approx(0.75) and weights[2:].sum() == pytest.approx(0.25)
    crops = RandomCrops(photos, 32, seed=0, weights=weights)
    picks = crops.rng.choice(len(photos), size=4000, p=weights)
    assert np.mean(picks < 2) == pytest.approx(0.75, abs=0.03)
    assert training_photos(str(small_photos))[1] is None  # one folder: uniform, as before


def test_a_list_file_is_a_source(small_photos, tmp_path):
    """A text file of paths (relative to the list's folder, # comments) trains like a folder, weight and all."""
    from gqtok.training.data import training_photos

    from gqtok.photos import HELDOUT

    paths = [p for p in sorted(small_photos.glob("*.jpg")) if p.stem not in HELDOUT]
    listing = tmp_path / "lists" / "mine.txt"
    listing.parent.mkdir()
    listing.write_text("# three of them\n" + "\n".join(f"../{p.parent.name}/{p.name}" for p in paths[:3]) + "\n\n")
    (tmp_path / small_photos.name).symlink_to(small_photos.resolve())
    photos, weights = training_photos([f"{listing}:2", str(small_photos)])
    assert [p.name for p in photos[:3]] == [p.name for p in paths[:3]]
    assert weights[:3].sum() == pytest.approx(2 / 3)
    listing.write_text("../nowhere.jpg\n")
    with pytest.raises(FileNotFoundError, match="do not exist"):
        training_photos(str(listing))


def test_random_resized_crops_see_wider_windows(small_photos):
    from gqtok.training.data import RandomCrops, training_photos

    photos, _ = training_photos(str(small_photos))
    plain = RandomCrops(photos[:2], 64, seed=1)
    zoomed = RandomCrops(photos[:2], 64, seed=1, window_max=4.0)
    a, b = plain.batch(16), zoomed.batch(16)
    assert a.shape == b.shape == (16, 64, 64, 3)
    # a window 1-4x wider, shrunk to 64 px, holds more detail per pixel: larger gradients on average
    grad = lambda x: np.abs(np.diff(x.astype(float), axis=2)).mean()  # noqa: E731
    assert grad(b) > grad(a)
    with pytest.raises(ValueError, match="at least 1"):
        RandomCrops(photos[:1], 64, window_max=0.5)


def test_grey_and_dark_crops_come_at_their_rates(small_photos):
    from gqtok.training.data import RandomCrops, training_photos
    from gqtok.training.train import TrainConfig

    photos, _ = training_photos(str(small_photos))
    plain = RandomCrops(photos[:2], 32, seed=3).batch(64)
    both = RandomCrops(photos[:2], 32, seed=3, grey_prob=0.5, dark_prob=0.5).batch(64)
    grey = np.array([np.all(b[..., 0] == b[..., 1]) and np.all(b[..., 1] == b[..., 2]) for b in both])
    assert 16 <= grey.sum() <= 48 and not any(np.all(b[..., 0] == b[..., 2]) for b in plain)
    assert both.mean() < plain.mean() * 0.9  # half of them darkened to 15-60 %
    none = RandomCrops(photos[:2], 32, seed=3, grey_prob=0.0, dark_prob=0.0).batch(64)
    assert np.array_equal(none, plain)  # off: the same crops as before (a resumed run draws the same)
    with pytest.raises(ValueError, match="grey_prob"):
        TrainConfig(grey_prob=1.5)


def test_cosine_schedule_warms_up_then_decays():
    from gqtok.training.train import TrainConfig

    cfg = TrainConfig(steps=100, lr=1e-3, lr_schedule="cosine", warmup_steps=10, lr_final_ratio=0.1)
    assert cfg.lr_at(0) == pytest.approx(1e-4) and cfg.lr_at(9) == pytest.approx(1e-3)
    assert cfg.lr_at(10) == pytest.approx(1e-3) and cfg.lr_at(100) == pytest.approx(1e-4)
    assert cfg.lr_at(55) == pytest.approx(1e-4 + 0.9e-3 * 0.5)
    assert TrainConfig(lr=3e-4).lr_at(12345) == 3e-4
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="step")


def test_ema_weights_are_saved_resumed_and_used(small_photos, tmp_path):
    from gqtok.training.train import load_run

    kw = dict(data=small_photos, preset="tiny", progress=False)
    base = {"steps": 12, "image_every": 0, "ema_decay": 0.9}  # constant lr: a cosine one depends on `steps`
    train(tmp_path / "straight", overrides=base, **kw)
    train(tmp_path / "split", overrides={**base, "steps": 6}, **kw)
    train(tmp_path / "split", overrides={"steps": 12}, resume=True, **kw)
    a, b = load_file(str(tmp_path / "straight" / "model.safetensors")), load_file(str(tmp_path / "split" / "model.safetensors"))
    assert any(k.startswith("ema.") for k in a) and all(torch.equal(a[k], b[k]) for k in a)
    ema_model, _ = load_run(tmp_path / "straight")
    raw_model, _ = load_run(tmp_path / "straight", ema=False)
    name = next(k for k, v in raw_model.state_dict().items() if v.is_floating_point())
    assert not torch.equal(ema_model.state_dict()[name], raw_model.state_dict()[name])
    assert torch.equal(ema_model.state_dict()[name], a[f"ema.{name}"])


def test_ema_decay_warms_up(small_photos, tmp_path):
    """At 0.999 from the start the average would stay near the initial weights for thousands of steps; warmed up,
    after 10 steps it is nearer the model than the initial weights are."""
    from gqtok.training.model import GaussianVAE
    from gqtok.training.train import build_configs, load_run

    train(tmp_path / "run", small_photos, "tiny", {"steps": 10, "image_every": 0, "ema_decay": 0.999},
          progress=False)
    torch.manual_seed(0)  # the trainer's seed: the initial weights
    init = GaussianVAE(build_configs("tiny")[0]).state_dict()
    ema, _ = load_run(tmp_path / "run")
    raw, _ = load_run(tmp_path / "run", ema=False)
    name = "decoder.conv_out.weight"
    to_raw = lambda w: (w - raw.state_dict()[name]).norm().item()  # noqa: E731
    assert to_raw(ema.state_dict()[name]) < 0.5 * to_raw(init[name])


def test_effnet_encoder_starts_from_imagenet_and_resumes_with_ema(small_photos, tmp_path):
    """A new run's trunk holds the ImageNet weights (lr 0: exactly); its BatchNorm counters save beside their EMA
    copies (safetensors refuses shared tensors) and the run resumes."""
    from gqtok.training.effnet import imagenet_state

    kw = dict(data=small_photos, preset="tiny", progress=False)
    settings = {"encoder": "effnet-lite0", "steps": 2, "lr": 0.0, "image_every": 0, "ema_decay": 0.9}
    train(tmp_path / "eff", overrides=settings, **kw)
    train(tmp_path / "eff", overrides={"steps": 3}, resume=True, **kw)
    saved = load_file(str(tmp_path / "eff" / "model.safetensors"))
    stem = imagenet_state()["_conv_stem.weight"]
    assert torch.equal(saved["model.encoder.trunk.conv_stem.weight"], stem)
    assert torch.allclose(saved["ema.encoder.trunk.conv_stem.weight"], stem, atol=1e-6)  # 0.9 x + 0.1 x rounds


def test_init_from_a_run_and_from_an_exported_model(tiny_run, tiny_model, small_photos, tmp_path):
    """Fine-tuning starts from the source's weights: with lr 0, one step leaves them exactly as they were."""
    from gqtok.training.train import load_run

    source, _ = load_run(tiny_run)
    for i, origin in enumerate((tiny_run, tiny_model)):
        out = tmp_path / f"ft{i}"
        train(out, small_photos, "default", {"steps": 1, "lr": 0.0, "image_every": 0, "ema_decay": 0.0,
                                             "init_from": str(origin)}, progress=False)
        tuned, config = load_run(out)
        assert config["model"] == json.loads(json.dumps(source.cfg.to_dict()))  # the source's model, not the preset's
        assert all(torch.equal(v, tuned.state_dict()[k]) for k, v in source.state_dict().items())
    with pytest.raises(ValueError, match="model settings cannot change"):
        train(tmp_path / "bad", small_photos, "tiny", {"init_from": str(tiny_run), "token_dim": 2}, progress=False)


def test_init_from_a_model_without_weights_says_so(tmp_path):
    import shutil

    from gqtok.core.models import find_model
    from gqtok.training.train import load_weights

    load_weights(find_model())  # the embedded default model ships its weights
    old = tmp_path / "exported-before-weights"
    shutil.copytree(find_model(), old, ignore=shutil.ignore_patterns("weights.safetensors"))
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["files"]["weights.safetensors"]  # as models exported before weights were shipped
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FileNotFoundError, match="without torch weights"):
        load_weights(old)
    with pytest.raises(FileNotFoundError, match="neither a training run"):
        load_weights(tmp_path / "nothing-here")


def test_colour_terms_train_and_resume_to_the_same_weights(small_photos, tmp_path):
    """The colour fine-tune's settings (low-frequency term, grey and dark crops) train, and a run stopped half way
    resumes to the same weights: the crops' extra random draws are part of the checkpointed data stream."""
    kw = dict(data=small_photos, preset="tiny", progress=False)
    base = {"steps": 8, "image_every": 0, "colour_weight": 2.0, "chroma_weight": 4.0, "grey_prob": 0.5, "dark_prob": 0.5}
    last = train(tmp_path / "straight", overrides=base, **kw)
    train(tmp_path / "split", overrides={**base, "steps": 4}, **kw)
    train(tmp_path / "split", overrides={"steps": 8}, resume=True, **kw)
    a, b = load_file(str(tmp_path / "straight" / "model.safetensors")), load_file(str(tmp_path / "split" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a) and np.isfinite(last["loss"])


def test_opponent_chroma_is_zero_exactly_on_grey():
    from gqtok.training.train import opponent_chroma

    grey = torch.rand(2, 1, 4, 4).expand(2, 3, 4, 4)
    assert opponent_chroma(grey).shape == (2, 2, 4, 4) and opponent_chroma(grey).abs().max() == 0
    tinted = grey.clone()
    tinted[:, 2] += 0.1  # bluer: (R + G) / 2 - B falls by 0.1, R - G stays
    assert torch.allclose(opponent_chroma(tinted)[:, 1], torch.full((2, 4, 4), -0.1))
    assert opponent_chroma(tinted)[:, 0].abs().max() == 0


def test_a_fine_tune_freezes_the_norms_and_exports_them(tiny_run, small_photos, tmp_path):
    """--norm fixed on a fine-tune measures the source's GroupNorm statistics on training crops and keeps them
    in the checkpoint, a later fine-tune keeps the source's fixed norms unless told otherwise, and the ONNX
    graphs compute what torch does."""
    from gqtok.core.artifact import load_artifact
    from gqtok.export.exporter import export_run
    from gqtok.service.runtime import TokenizerRuntime
    from gqtok.training.train import load_run

    run = tmp_path / "fixed"
    train(run, small_photos, "tiny", {"steps": 4, "image_every": 0, "init_from": str(tiny_run), "norm": "fixed"},
          progress=False)
    assert json.loads((run / "config.json").read_text())["model"]["norm"] == "fixed"
    state = load_file(str(run / "model.safetensors"))
    var = [k for k in state if k.endswith("stat_var")]
    assert var and all(k.replace("stat_var", "stat_mean") in state for k in var)
    assert not any(torch.equal(state[k], torch.ones_like(state[k])) for k in var)  # measured, not the initial 1s
    again = tmp_path / "again"
    train(again, small_photos, "tiny", {"steps": 2, "image_every": 0, "init_from": str(run)}, progress=False)
    assert json.loads((again / "config.json").read_text())["model"]["norm"] == "fixed"

    export_run(run, tmp_path / "model", model_id="fixed")
    model, _ = load_run(run)
    image = torch.rand(1, 3, 96, 128) * 2 - 1
    runtime = TokenizerRuntime(load_artifact(tmp_path / "model"), device="cpu", threads=1)
    mu, _ = runtime.encode(((image + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy())
    with torch.no_grad():
        expected = ((model.decoder(torch.from_numpy(mu)) + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert np.abs(runtime.decode(mu) - expected).max() < 1e-4


def test_decoder_on_tokens_trains_the_decoder_alone(tiny_run, small_photos, tmp_path):
    """--decoder-on-tokens: the encoder's weights stay exactly as the source's (the EMA weights too, which are the
    ones load_run and export take), the decoder's move, the log has
    no KL (no TDC), the loss is the decoder's error on GQ's codewords (not on a posterior sample), and a baseline
    is refused."""
    from gqtok.training.train import load_run

    source, _ = load_run(tiny_run)
    run = tmp_path / "dec"
    last = train(run, small_photos, "tiny", {"steps": 3, "crop": 32, "image_every": 0, "log_every": 1, "ema_decay": 0.9,
                                             "init_from": str(tiny_run), "decoder_on_tokens": True}, progress=False)
    tuned, _ = load_run(run)
    enc = {k: v for k, v in source.state_dict().items() if k.startswith("encoder.")}
    dec = [k for k in source.state_dict() if k.startswith("decoder.") and source.state_dict()[k].is_floating_point()]
    assert enc and all(torch.equal(v, tuned.state_dict()[k]) for k, v in enc.items())
    assert any(not torch.equal(source.state_dict()[k], tuned.state_dict()[k]) for k in dec)
    assert "kl_mean" not in last and "lam" not in last
    # the first step's loss is the source model's L1 error decoding GQ's tokens of the same crops
    from gqtok.training import data as photo_data
    from gqtok.training.gq import GaussianQuantize

    paths, weights = photo_data.training_photos(small_photos)
    x = photo_data.to_model_input(photo_data.RandomCrops(paths, 32, seed=0, weights=weights).batch(8))
    cfg = source.cfg
    gq = GaussianQuantize(cfg.num_codes, cfg.token_dim, cfg.codebook_seed, cfg.gq_beta)
    with torch.no_grad():
        mu, logvar = source.encoder(x)
        expected = torch.nn.functional.l1_loss(source.decoder(gq(mu, logvar)[0]), x).item()
        sampled = torch.nn.functional.l1_loss(source(x)[0], x).item()
    first = json.loads((run / "log.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(first["recon"]) == pytest.approx(expected, rel=1e-4)
    assert abs(sampled - expected) > 1e-4 * expected  # what the check tells apart
    fsq = tmp_path / "fsq"
    train(fsq, small_photos, "tiny", {"quantizer": "fsq", "latent_channels": 6, "token_dim": 6, "steps": 1,
                                      "image_every": 0}, progress=False)
    with pytest.raises(ValueError, match="decoder_on_tokens decodes GQ tokens"):
        train(tmp_path / "bad", small_photos, "tiny", {"steps": 1, "init_from": str(fsq), "decoder_on_tokens": True},
              progress=False)
