"""GQ + TDC against the other tokenizers at equal bits per token, same networks, same training budget: the first
study, on 64x64 crops with the first default model's network (benchmarks/quality.py asks again at today's recipe).

    python benchmarks/quality_64px.py --budget MINUTES [--jobs 2] [--quick]

Trains every model for the same number of steps on the same encoder/decoder
(the `compare` architecture below): the steps that the reference gq_tdc makes
in MINUTES on one CPU thread, measured at the start. It then evaluates on the 24 held-out photos
(centre crops, 384x256 by default; --size 512 768 for the full evaluation size):
  gq_tdc            Gaussian VAE + TDC, GQ at d = 16 (0.25 bpp), and d = 8, 4 (0.5, 1 bpp)
  gq_tdc_floorF     the same with a floor F under TDC's lam (--tdc-lam-floor)
  plain_kl_W        Gaussian VAE with a fixed KL weight W (a small sweep), converted by GQ, and by
                    TokenBridge-style per-channel scalar quantization (2 levels = 16 bits per position;
                    64 levels = 96 bits per position as a higher-rate point)
  vq, fsq, lfq, bsq the baselines, trained with their quantizer in the loop (training/quantizers/)
  jpeg, webp        Pillow at the quality that lands closest below each bpp
Metrics: PSNR, SSIM, MS-SSIM, FD-EffNetLite0 (a Frechet distance on EfficientNet-Lite0 features;
not FID), codebook usage and perplexity. Also a theory check: per-token GQ error against the
bits of slack log2 K - KL. Writes benchmarks/results/quality_64px.json, quality_64px.md,
quality_64px_rd.png and quality_64px_theory.png. --quick: a few seconds per method on small crops (< 60 s in all).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"

# The shared architecture: the default preset's shape without attention, trained on 64x64 crops in
# bf16 so that a CPU gets a few hundred steps per method in minutes.
# (first default model's network and schedule, pinned: the default preset has since changed)
COMPARE = dict(downsample=8, patch=1, base_channels=32, channel_mult=(1, 2, 2, 4), blocks_per_level=1, attention=False,
               groups=16, crop=64, batch_size=8, lr=2e-4, lr_schedule="constant", ema_decay=0.0, crop_window_max=1.0,
               precision="bf16", log_every=25, image_every=0, ckpt_every=0, steps=10**9)
QUICK = dict(COMPARE, base_channels=16, channel_mult=(1, 1, 2, 2), groups=8, crop=32, batch_size=4)
BASE = dict(latent_channels=16, token_dim=16, codebook_bits=16)
KL_WEIGHTS = (1e-6, 1e-5, 1e-4)
LAM_FLOORS = (3e-6, 1e-5)  # TDC with a floor under lam (--tdc-lam-floor); the reference rule has none


def method_table(quick: bool) -> list[tuple[str, dict, list[str]]]:
    """(run name, settings, evaluations) for every trained model."""
    table = [
        ("gq_tdc", BASE, ["gq"]),
        ("gq_tdc_d8", dict(BASE, token_dim=8), ["gq"]),
        ("gq_tdc_d4", dict(BASE, token_dim=4), ["gq"]),
        *[(f"plain_kl_{w:g}", dict(BASE, kl_mode="fixed", kl_weight=w), ["gq", "tokenbridge:2", "tokenbridge:64"])
          for w in (KL_WEIGHTS[1:2] if quick else KL_WEIGHTS)],
        *[(f"gq_tdc_floor{f:g}", dict(BASE, tdc_lam_floor=f), ["gq"]) for f in ([] if quick else LAM_FLOORS)],
        ("vq", dict(BASE, quantizer="vq"), ["vq"]),
        ("fsq", dict(quantizer="fsq", latent_channels=6, token_dim=6, codebook_bits=16), ["fsq"]),
        ("lfq", dict(BASE, quantizer="lfq"), ["lfq"]),
        ("bsq", dict(BASE, quantizer="bsq"), ["bsq"]),
    ]
    return table[:1] + table[3:4] + table[-4:] if quick else table


def calibrate_steps(budget_min: float, arch: dict) -> tuple[int, float]:
    """Steps that the reference model (gq_tdc) makes in `budget_min` minutes on one thread here.

    Every method then trains exactly that many steps: wall time alone would hand more steps to
    whichever job happened to run alone on a core."""
    import torch

    from gqtok.training.model import GaussianVAE, kl_bits_per_token
    from gqtok.training.train import build_configs

    torch.set_num_threads(1)
    mcfg, tcfg = build_configs("default", {**{k: v for k, v in arch.items() if k != "steps"}, **BASE})
    torch.manual_seed(0)
    model = GaussianVAE(mcfg)
    opt = torch.optim.Adam(model.parameters(), lr=tcfg.lr)
    x = torch.rand(tcfg.batch_size, 3, tcfg.crop, tcfg.crop) * 2 - 1
    times = []
    for i in range(7):
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=tcfg.precision == "bf16"):
            recon, mu, logvar, _ = model(x)
        loss = (recon.float() - x).abs().mean() + 1e-6 * kl_bits_per_token(mu, logvar, mcfg.token_dim).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= 2:  # the first steps warm up allocators and kernels
            times.append(time.perf_counter() - t)
    per_step = float(np.median(times))
    return max(5, int(budget_min * 60 / per_step)), per_step


def train_and_evaluate(job: dict) -> list[dict]:
    """One worker: train one method for its budget, then run each of its evaluations."""
    import torch

    torch.set_num_threads(1)
    from gqtok.training.evaluate import evaluate
    from gqtok.training.train import train

    run = Path(job["run"])
    t0 = time.monotonic()
    config = run / "config.json"
    saved = json.loads(config.read_text()) if config.exists() else {}
    finished = saved.get("ranks") and saved.get("step") == job["steps"]  # "ranks" is written when fit() ends
    if not finished or job["retrain"]:
        if run.exists():
            import shutil

            shutil.rmtree(run)
        train(run, job["data"], preset="default", overrides=job["settings"], progress=False)
    train_s = time.monotonic() - t0
    out = []
    for how in job["evals"]:
        # each evaluation is kept beside its run, so that a rerun (or a second process, see --methods)
        # reuses it as long as the model and the evaluation settings are the same
        cache = run / f"quality_eval_{how.replace(':', '_')}.json"
        key = {"step": job["steps"], "size": list(job["size"]), "limit": job["limit"]}
        cached = json.loads(cache.read_text()) if cache.exists() else {}
        if cached.get("key") == key and not job["retrain"]:
            r = cached["result"]
        else:
            method, _, levels = how.partition(":")
            r = evaluate(run, job["data"], size=job["size"], limit=job["limit"], progress=False, method=method,
                         tokenbridge_levels=int(levels or 64), fd=True)
            r.pop("per_image")
            cache.write_text(json.dumps({"key": key, "result": r}))
        out.append({"name": job["name"] + ("" if how in ("gq", job["name"]) else f"+{how}"),
                    "trained": job["name"], "eval": how, "train_seconds": round(train_s, 1), **r})
    return out


def classic_codecs(data: Path, size, limit, targets) -> list[dict]:
    """JPEG and WebP (Pillow) at the highest quality whose bpp stays at or under each target."""
    from gqtok import photos as photo_files
    from gqtok.training.evaluate import classic_at_bpp, image_metrics

    _, held = photo_files.split_heldout(photo_files.list_images(data))
    images = [photo_files.center_crop(photo_files.load_rgb(p), size) for p in held[:limit]]

    rows = []
    for fmt in ("JPEG", "WEBP"):
        for target in targets:
            metrics, bpps = [], []
            for img in images:
                decoded, bpp, _ = classic_at_bpp(img, fmt, target)
                bpps.append(bpp)
                metrics.append(image_metrics(img, decoded))
            rows.append({"name": f"{fmt.lower()}@{target:g}", "method": fmt.lower(), "images": len(images),
                         "rate": {"bpp": float(np.mean(bpps)), "target_bpp": target},
                         "quantized": {k: (float(np.mean(v)) if (v := [m[k] for m in metrics if m[k] is not None])
                                           else None) for k in ("psnr", "ssim", "ms_ssim")}})
    return rows


def theory_check(run: Path, data: Path, size, limit) -> dict:
    """Per token: mean |z_hat - mu| / sigma over its d channels against log2 K - KL (bits of slack)."""
    import torch

    from gqtok.core import layout
    from gqtok import photos as photo_files
    from gqtok.training import data as photo_data
    from gqtok.training.gq import GaussianQuantize
    from gqtok.training.model import kl_bits_per_token
    from gqtok.training.train import load_run

    model, _ = load_run(run)
    cfg = model.cfg
    gq = GaussianQuantize(cfg.num_codes, cfg.token_dim, cfg.codebook_seed, cfg.gq_beta)
    _, held = photo_files.split_heldout(photo_files.list_images(data))
    slack, err = [], []
    with torch.no_grad():
        for p in held[:limit]:
            x = photo_data.to_model_input(photo_files.center_crop(photo_files.load_rgb(p), size)[None])
            mu, logvar = model.encoder(x)
            z_hat, _, _ = gq(mu, logvar)
            e = layout.group((z_hat - mu).abs() / torch.exp(0.5 * logvar), cfg.token_dim).mean(-1)
            slack.append((cfg.codebook_bits - kl_bits_per_token(mu, logvar, cfg.token_dim)).flatten().numpy())
            err.append(e.flatten().numpy())
    slack, err = np.concatenate(slack), np.concatenate(err)
    edges = np.arange(np.floor(slack.min()), np.ceil(slack.max()) + 1, 1.0)
    bins = []
    for a, b in zip(edges[:-1], edges[1:]):
        sel = (slack >= a) & (slack < b)
        if sel.sum() >= 5:
            bins.append({"slack_bits": float((a + b) / 2), "tokens": int(sel.sum()),
                         "median_error": float(np.median(err[sel])), "p90_error": float(np.percentile(err[sel], 90))})
    return {"run": str(run), "bins": bins, "tokens": int(slack.size)}


def plots(result: dict, out_dir: Path, suffix: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    rows = result["rows"]
    families = (("gq_tdc", "o"), ("gq_tdc_floor", "D"), ("plain_kl", "s"), ("vq", "^"), ("fsq", "v"), ("lfq", "<"),
                ("bsq", ">"), ("jpeg", "x"), ("webp", "+"))
    for family, marker in families:
        def member(name: str) -> bool:  # the longest family prefix decides: gq_tdc_floor* is not gq_tdc
            return max((f for f, _ in families if name.startswith(f)), key=len, default=None) == family

        pts = sorted((r["rate"]["bpp"], r["quantized"]["psnr"], r["name"]) for r in rows
                     if member(r["name"]) and r["rate"]["bpp"] <= 1.6)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, linestyle="-" if family in
                    ("gq_tdc", "jpeg", "webp") else "none", label=family)
    ax.set_xlabel("bits per pixel")
    ax.set_ylabel(f"PSNR (dB), held-out {result['size'][1]}x{result['size'][0]}")
    ax.set_title(f"Rate-distortion, {result['steps_per_model']} training steps per model")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / f"quality_64px_rd{suffix}.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for check in result["theory"]:
        b = check["bins"]
        ax.semilogy([x["slack_bits"] for x in b], [x["median_error"] for x in b], marker="o", label=Path(check["run"]).name)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlabel("log2 K - KL(q||p) of the token (bits)")
    ax.set_ylabel("median |z_hat - mu| / sigma")
    ax.set_title("GQ error against the bits of slack")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / f"quality_64px_theory{suffix}.png", dpi=110)
    plt.close(fig)


def markdown(result: dict) -> str:
    def f(v, fmt):
        return format(v, fmt) if v is not None else "-"

    how = (f"what gq_tdc makes in {result['budget_min']:g} min on one CPU thread" if result["budget_min"]
           else "set by --steps")
    lines = [f"Budget: {result['steps_per_model']} training steps per model ({how}); held-out {result['images']} "
             f"photos at {result['size'][1]}x{result['size'][0]}.",
             "", "| method | bpp | bits/token | PSNR | SSIM | MS-SSIM | FD-EffNetLite0 | codebook used | perplexity | steps |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(result["rows"], key=lambda r: (r["rate"]["bpp"], -(r["quantized"]["psnr"] or 0))):
        cb, fd = r.get("codebook") or {}, (r.get("fd_effnet_lite0") or {}).get("quantized")
        lines.append(f"| {r['name']} | {r['rate']['bpp']:.3f} | {f(r['rate'].get('bits_per_token'), '.2f')} | "
                     f"{r['quantized']['psnr']:.2f} | {r['quantized']['ssim']:.4f} | {f(r['quantized']['ms_ssim'], '.4f')} | "
                     f"{f(fd, '.2f')} | {f(cb.get('used_fraction'), '.3f')} | {f(cb.get('perplexity'), '.0f')} | "
                     f"{r.get('step') or '-'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=5.0, help="minutes of training per model (default 5)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="models trained at once (1 thread each)")
    ap.add_argument("--data", default=str(REPO / "data" / "endless-sky"))
    ap.add_argument("--runs", default=str(REPO / "runs" / "quality"), help="where the trained runs go")
    ap.add_argument("--retrain", action="store_true", help="train again even where a run exists")
    ap.add_argument("--quick", action="store_true", help="seconds per method, small crops: a smoke run (< 60 s)")
    ap.add_argument("--size", type=int, nargs=2, default=[256, 384], metavar=("H", "W"),
                    help="held-out centre crops (default 256 384: a CPU decodes 768x512 ~4x slower)")
    ap.add_argument("--out-dir", default=str(RESULTS))
    ap.add_argument("--steps", type=int, default=None, help="training steps per model (instead of calibrating --budget)")
    ap.add_argument("--methods", nargs="+", default=None, metavar="RUN",
                    help="train and evaluate only these runs (e.g. vq fsq), in this order, and write no results: "
                         "a second process can share the work of a full run on another core; then run the full "
                         "command with the same --steps, which reuses the finished runs and evaluations")
    args = ap.parse_args(argv)

    if args.quick:
        budget, arch, size, limit, runs = 0.03, QUICK, (128, 128), 2, Path(args.runs + "-quick")
    else:
        budget, arch, size, limit, runs = args.budget, COMPARE, tuple(args.size), None, Path(args.runs)
    if args.steps:
        steps, per_step, budget = args.steps, None, None
    else:
        steps, per_step = calibrate_steps(budget, arch)
        print(f"{budget:g} min per model = {steps} steps ({per_step:.3f} s per step of gq_tdc on one thread)", flush=True)
    jobs = [{"name": name, "run": str(runs / name), "data": Path(args.data), "size": size, "limit": limit,
             "retrain": args.retrain or args.quick, "evals": evals, "steps": steps,
             "settings": {**arch, **settings, "steps": steps}}
            for name, settings, evals in method_table(args.quick)]
    if args.methods:
        by_name = {job["name"]: job for job in jobs}
        unknown = set(args.methods) - set(by_name)
        if unknown:
            ap.error(f"unknown runs {sorted(unknown)}; the runs are {sorted(by_name)}")
        jobs = [by_name[name] for name in args.methods]
    start = time.monotonic()
    rows = []
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for out in pool.map(train_and_evaluate, jobs):
            for r in out:
                print(f"{r['name']:<28} bpp {r['rate']['bpp']:.3f}  PSNR {r['quantized']['psnr']:.2f}  "
                      f"SSIM {r['quantized']['ssim']:.4f}  steps {r['step']}", flush=True)
            rows += out
    if args.methods:
        return {"rows": rows}
    targets = sorted({round(r["rate"]["bpp"], 2) for r in rows if r["rate"]["bpp"] <= 1.6})
    rows += classic_codecs(Path(args.data), size, limit, targets)
    names = ("gq_tdc", f"gq_tdc_floor{LAM_FLOORS[0]:g}", *(f"plain_kl_{w:g}" for w in KL_WEIGHTS))
    theory = [theory_check(runs / name, Path(args.data), size, limit or 8) for name in names
              if (runs / name / "model.safetensors").exists()]
    result = {"benchmark": "quality_64px", "quick": args.quick, "budget_min": budget, "steps_per_model": steps,
              "seconds_per_step_reference": per_step and round(per_step, 4), "jobs": args.jobs,
              "cpus": os.cpu_count(), "size": list(size), "images": rows[0]["images"], "architecture": arch,
              "seconds": round(time.monotonic() - start, 1), "rows": rows, "theory": theory}
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    # paths inside the repository are recorded relative to it
    (out_dir / f"quality_64px{suffix}.json").write_text(json.dumps(result, indent=1).replace(str(REPO) + os.sep, "") + "\n")
    (out_dir / f"quality_64px{suffix}.md").write_text(markdown(result))
    plots(result, out_dir, suffix)
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
