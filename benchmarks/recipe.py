"""Recipe study at a fixed CPU budget: which training choices buy PSNR per CPU-minute.

    python benchmarks/recipe.py --minutes 12 --jobs 2 [--quick]

Every arm trains the default preset for the same CPU time: the steps the baseline makes in MINUTES on one CPU thread,
measured first (a short calibration run); an arm that changes the network gets those steps scaled by its speed
against the baseline network (a few timed steps of each, side by side). Each arm runs on one thread, `--jobs` at a
time, and its CPU time is measured and reported. Arms (each adds to +floor's recipe, or to the one before it):
  baseline        the embedded default model's recipe: endless-sky photos, lr 2e-4 constant, 128 px crops, batch 8
  +photos         endless-sky and the Debian photos (gqtok data fetch --source debian-photos), weight 1 each
  +cosine         lr 1e-3 peak, 5% warm-up, cosine to 10%
  +ema            EMA of the weights, decay 0.99 (short runs: a longer horizon would lag)
  +windows        random resized crops, windows up to 3x the crop side
  +floor          TDC with lam >= 3e-6
  +unshuffle      pixel-unshuffle stem and pixel-shuffle head (patch 2): the full-resolution level goes, the widths
                  of the others stay (64, 64, 128); about 1.8x the steps in the same time
  +unshuffle-wide the same at 1.5x the width (96, 96, 192): about the baseline's speed, 2.2x its parameters
  +unshuffle-deep the same widths as +unshuffle, two ResNet blocks per level
  +mse            +unshuffle trained on MSE instead of L1 (the loss PSNR measures)
  +effnet         +unshuffle with EfficientNet-Lite0's first stages (ImageNet weights) as the encoder's start
  +effnet+mse     both
  no-attention    +effnet+mse without the self-attention at the lowest level (the default preset's recipe)
Each arm's GQ tokens are evaluated at 256x256 on the held-out photos of the Debian sources (none of them in the
baseline's training) and on the 24 held-out endless-sky photos. Writes benchmarks/results/recipe.json, recipe.md
and recipe.png (training PSNR against CPU-minutes). Runs are kept in runs/recipe/ and reused when finished.
--quick: the tiny preset for a few steps, a few photos (< 60 s).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"
# fp32: on this CPU (no native bf16) a bf16 step of the default preset took 4.6 s against 2.2 s in fp32, one thread
COMMON = dict(precision="fp32", log_every=10, image_every=0, ckpt_every=100)


# The first default model's recipe, spelled out so that the study keeps its meaning whatever the preset becomes
# (the preset now holds the recipe this study chose)
BASELINE = dict(patch=1, attention=True, channel_mult=(1, 2, 2, 4), encoder="resnet", lr=2e-4, lr_schedule="constant",
                warmup_steps=0, ema_decay=0.0, crop_window_max=1.0, recon_loss="l1", tdc_lam_floor=0.0)


def arms(endless: str, photos: str, steps: int) -> list[tuple[str, dict, list[str]]]:
    both = [f"{endless}:1", f"{photos}:1"]
    cosine = dict(BASELINE, lr=1e-3, lr_schedule="cosine", warmup_steps=max(1, steps // 20), lr_final_ratio=0.1)
    ema = dict(cosine, ema_decay=0.99)
    windows = dict(ema, crop_window_max=3.0)
    floor = dict(windows, tdc_lam_floor=3e-6)
    unshuffle = dict(floor, patch=2, channel_mult=(2, 2, 4))
    return [("baseline", BASELINE, [endless]), ("+photos", BASELINE, both), ("+cosine", cosine, both), ("+ema", ema, both),
            ("+windows", windows, both), ("+floor", floor, both), ("+unshuffle", unshuffle, both),
            ("+unshuffle-wide", dict(unshuffle, base_channels=48), both),
            ("+unshuffle-deep", dict(unshuffle, blocks_per_level=2), both),
            ("+mse", dict(unshuffle, recon_loss="mse"), both),
            ("+effnet", dict(unshuffle, encoder="effnet-lite0"), both),
            ("+effnet+mse", dict(unshuffle, encoder="effnet-lite0", recon_loss="mse"), both),
            ("no-attention", dict(unshuffle, encoder="effnet-lite0", recon_loss="mse", attention=False), both)]


NETWORK = ("encoder", "patch", "base_channels", "channel_mult", "blocks_per_level", "attention")


def step_seconds(preset: str, settings: dict, repeats: int = 5) -> float:
    """Median seconds of one training step (forward, backward, Adam) of the preset's network with `settings`'
    network fields, on one thread, at the preset's crop and batch."""
    import torch

    from gqtok.training.model import GaussianVAE
    from gqtok.training.train import build_configs

    torch.set_num_threads(1)
    cfg, tc = build_configs(preset, {k: v for k, v in settings.items() if k in NETWORK})
    model = GaussianVAE(cfg)
    opt = torch.optim.Adam(model.parameters())
    x = torch.randn(tc.batch_size, 3, tc.crop, tc.crop)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        recon, mu, logvar, _ = model(x)
        loss = (recon - x).abs().mean() + mu.square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return sorted(times)[repeats // 2]


def train_arm(job: dict) -> dict:
    """One arm in its own process on one thread: train (or reuse a finished run), then evaluate."""
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    from gqtok.training.evaluate import evaluate_tokenizer, run_tokenizer
    from gqtok.training.train import train

    torch.set_num_threads(1)
    run = Path(job["run"])
    done = run / "recipe.json"
    if done.exists():
        return json.loads(done.read_text())
    start = time.process_time()
    resume = (run / "model.safetensors").exists()
    train(run, job["data"], preset=job["preset"], overrides=job["settings"], resume=resume, progress=False)
    cpu_min = (time.process_time() - start) / 60
    tokenize, detokenize, bits = run_tokenizer(run)
    evals = {name: evaluate_tokenizer(tokenize, detokenize, paths, job["size"], bits, classic=False, progress=False,
                                      greyed=False) for name, paths in job["eval"].items()}
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    result = {"arm": job["arm"], "settings": job["settings"], "data": job["data"], "steps": job["settings"]["steps"],
              "cpu_minutes": cpu_min if not resume else None,
              "eval": {k: {"images": v["images"], "psnr": v["tokens"]["psnr"], "ms_ssim": v["tokens"]["ms_ssim"]}
                       for k, v in evals.items()},
              "curve": [(r["step"], r["time_s"] / 60, r["psnr"]) for r in log]}
    done.write_text(json.dumps(result, indent=1))
    return result


def calibrate(preset: str, data: str, seconds: float, out: Path) -> float:
    """Steps per minute of the baseline's training loop on one thread, from its own log (photo loading, which
    takes tens of seconds of CPU for the high-resolution sets, is not part of the rate)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    from gqtok.training.train import train

    torch.set_num_threads(1)
    train(out, [data], preset=preset, overrides=dict(COMMON, **BASELINE, steps=10**9, log_every=1, time_limit_min=seconds / 60),
          progress=False)
    last = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    return last["step"] / (last["time_s"] / 60)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in (r for r in results if r["curve"]):  # a --quick arm may end before its first log line
        steps, minutes, psnr = zip(*r["curve"])
        ax.plot(minutes, psnr, label=r["arm"])
    ax.set_xlabel("minutes of training (one thread, wall clock)")
    ax.set_ylabel("training-crop PSNR (dB)")
    ax.set_title("Recipe study: training PSNR against time")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(result: dict) -> str:
    lines = [f"Budget: {result['minutes']:g} baseline CPU-minutes on one thread ({result['steps']} steps of the baseline "
             f"network; arms that change the network get the steps that take the same time), "
             f"evaluated at {result['size'][0]}x{result['size'][1]}.", "",
             "| arm | steps | CPU-minutes | Debian sources held-out PSNR | endless-sky held-out PSNR | MS-SSIM (Debian) |",
             "| --- | --- | --- | --- | --- | --- |"]
    def f(value, fmt):
        return "-" if value is None else format(value, fmt)

    for r in result["arms"]:
        e = r["eval"]
        lines.append(f"| {r['arm']} | {r['steps']} | {f(r['cpu_minutes'], '.1f')} | {f(e['debian']['psnr'], '.2f')} | "
                     f"{f(e['endless-sky']['psnr'], '.2f')} | {f(e['debian']['ms_ssim'], '.3f')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=12.0, help="baseline CPU-minutes that set every arm's steps")
    ap.add_argument("--jobs", type=int, default=2, help="arms trained at once, one thread each (default 2)")
    ap.add_argument("--endless", default=str(REPO / "data" / "endless-sky"))
    ap.add_argument("--photos", default=str(REPO / "data" / "photos"), help="gqtok data fetch --source debian-photos")
    ap.add_argument("--runs", default=str(REPO / "runs" / "recipe"))
    ap.add_argument("--size", type=int, nargs=2, default=[256, 256])
    ap.add_argument("--arms", nargs="+", metavar="ARM",
                    help="train only these arms (e.g. +mse +effnet); the others are reported when finished, else left out")
    ap.add_argument("--quick", action="store_true", help="tiny preset, a few steps and photos (< 60 s)")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/recipe[_quick].json)")
    args = ap.parse_args(argv)

    from gqtok.photos import list_images, split_heldout

    preset = "tiny" if args.quick else "default"
    runs = Path(args.runs) / ("quick" if args.quick else "full")
    runs.mkdir(parents=True, exist_ok=True)
    calibration = runs / "calibration.json"
    if calibration.exists():
        rate = json.loads(calibration.read_text())["steps_per_cpu_minute"]
    else:
        rate = calibrate(preset, args.endless, 5 if args.quick else 60, runs / "calibration")
        calibration.write_text(json.dumps({"steps_per_cpu_minute": rate}))
    minutes = 0.05 if args.quick else args.minutes
    steps = max(4, int(rate * minutes))
    limit = 3 if args.quick else None
    evals = {"debian": [str(p) for p in split_heldout(list_images(args.photos))[1][:limit]],
             "endless-sky": [str(p) for p in split_heldout(list_images(args.endless))[1][:limit]]}
    # an arm that changes the network trains for the baseline's time: steps scaled by the measured speed ratio
    speed_file = runs / "speed.json"
    speed = json.loads(speed_file.read_text()) if speed_file.exists() else {}
    jobs = []
    for name, settings, data in arms(args.endless, args.photos, steps):
        if args.arms and name not in args.arms and not (runs / name.strip("+") / "recipe.json").exists():
            continue
        network = {k: v for k, v in settings.items() if k in NETWORK and v != BASELINE.get(k, v)}
        key = json.dumps(network, sort_keys=True)  # arms with one network share one measurement
        if network and key not in speed:
            base = {k: v for k, v in BASELINE.items() if k in NETWORK}
            speed[key] = step_seconds(preset, base) / step_seconds(preset, dict(base, **network))
            speed_file.write_text(json.dumps(speed, indent=1))
        arm_steps = max(4, int(steps * speed.get(key, 1.0)))
        if network:
            settings = dict(settings, warmup_steps=max(1, arm_steps // 20))
        jobs.append({"arm": name, "run": str(runs / name.strip("+")), "preset": preset, "data": data,
                     "settings": dict(COMMON, **settings, steps=arm_steps), "size": tuple(args.size), "eval": evals})
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(train_arm, jobs))
    result = {"preset": preset, "steps": steps, "minutes": minutes, "steps_per_cpu_minute": rate,
              "size": list(args.size), "eval_images": {k: len(v) for k, v in evals.items()}, "arms": results}
    out = Path(args.out or RESULTS / ("recipe_quick.json" if args.quick else "recipe.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1).replace(str(REPO) + os.sep, ""))  # repo-relative paths
    out.with_suffix(".md").write_text(markdown(result))
    plot(results, out.with_suffix(".png"))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
