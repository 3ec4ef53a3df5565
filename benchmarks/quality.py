"""GQ + TDC against FSQ, VQ, plain KL and TokenBridge at the default recipe, equal steps (issue 32).

    bash tools/train_quality.sh                            # the runs: about 14 CPU-hours, resumable
    python benchmarks/quality.py [--runs runs/quality32] [--photos data/photos] [--quick]

Evaluates every run in RUNS that has reached the steps its config asks for (the others are listed as
unfinished): the runs train with GroupNorm on 128x128 crops, so each is first given frozen norms measured on
training crops (`gqtok train --init-from RUN --norm fixed --steps 0`, ten CPU-seconds, no training: the same
for every method; GroupNorm's statistics would make a 768x512 photo a different input from the crops, see
training/model.py), then measured on the photos of the four sources held out whole, centre crops of 512x768
and 256x256 (training.evaluate.evaluate_tokenizer): PSNR, SSIM, MS-SSIM, FD-EffNetLite0 (a Frechet distance on
EfficientNet-Lite0 features; not FID), colour shift (and, a control on the frozen norms, PSNR and colour
shift at the training crop's size with the norms frozen and as trained); and on the same crops codebook usage
(share of the codes used, perplexity), the cost of quantizing in dB (the latent decoded unquantized against the
tokens: a Gaussian VAE's posterior mean, a baseline's value before rounding or lookup) and, for the Gaussian
VAEs, the KL per token (mean and spread). A run named NAME_sS is
seed S of NAME: the table gives each method's mean and the spread (max - min) over its seeds. A plain-KL run
(kl_mode fixed) is measured twice: through GQ, and through TokenBridge (2 levels per channel). Pillow's JPEG
and WebP are measured on the same crops at each learned rate, as anchors for the table and plot; and how the
plain-KL weight was chosen (the short runs in --calibration against TDC's reference rule). Writes
benchmarks/results/quality.json, its tables quality.md, a rate-distortion plot quality.png and
quality_rate_control.png (each Gaussian VAE's KL per token and TDC's lam over its training steps); --quick:
the same names with _quick, tiny runs trained here in seconds.

runs/ stays out of git and is not kept from one working session to the next here, so a run trained in an earlier
session may be gone when the study is evaluated again: its row, its training curves and the calibration are then
carried over from the committed quality.json (listed under "carried_over"), measured then by this harness.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.service import RESULTS, write_result  # noqa: E402

SIZES = ((512, 768), (256, 256))
METRICS = ("psnr", "ssim", "ms_ssim", "colour_shift")


def finished(run: Path) -> tuple[int, int]:
    """(steps reached at the last checkpoint, steps asked) of a run, from its config.json."""
    config = json.loads((run / "config.json").read_text())
    return config.get("step", 0), config["train"]["steps"]


def frozen(run: Path, data: Path, cache: Path) -> Path:
    """The run with frozen norms (cached beside the runs); a run trained with them already is itself."""
    from gqtok.training.train import train

    if json.loads((run / "config.json").read_text())["model"].get("norm") == "fixed":
        return run
    out = cache / run.name
    if not (out / "model.safetensors").exists():
        import shutil

        shutil.rmtree(out, ignore_errors=True)
        train(out, data, "default", {"init_from": str(run), "norm": "fixed", "steps": 0, "image_every": 0},
              progress=False)
    return out


def remembering(tokenize):
    """tokenize, keeping each crop's ids (a few MB for the study): a crop asked for again is not encoded again."""
    memo = {}

    def call(crop: np.ndarray) -> np.ndarray:
        key = (crop.shape, hashlib.sha256(np.ascontiguousarray(crop).data).digest())
        if key not in memo:
            memo[key] = np.asarray(tokenize(crop))
        return memo[key]

    return call


def token_statistics(model, tokenize, bits: float, paths: list[Path], size: tuple[int, int]) -> dict:
    """On the centre crops that evaluate_tokenizer measures (their ids come from `remembering`'s memo):
    codebook usage (share of the codes used, perplexity 2^entropy);
    the PSNR of the latent decoded without quantization (a Gaussian VAE's posterior mean, a baseline's value
    before rounding or lookup: the network's loss told apart from the quantizer's); and for a Gaussian VAE what
    explains GQ's cost, the KL per token in bits (mean, 5th and 95th percentiles, share within half a bit of
    GQ's log2 K).
    `model`: the run's torch model, `tokenize` its token path (training.evaluate.run_tokenizer)."""
    import torch

    from gqtok import photos as photo_files
    from gqtok.training import data as photo_data
    from gqtok.training.evaluate import image_metrics
    from gqtok.training.model import kl_bits_per_token

    counts, kl, psnr_continuous = {}, [], []
    for path in paths:
        img = photo_files.load_rgb(path)
        if img.shape[0] < size[0] or img.shape[1] < size[1]:
            continue
        crop = np.ascontiguousarray(photo_files.center_crop(img, size))[None]
        ids, n = np.unique(np.asarray(tokenize(crop)), return_counts=True)
        for i, c in zip(ids.tolist(), n.tolist()):
            counts[i] = counts.get(i, 0) + c
        with torch.no_grad():
            mu, logvar = model.encoder(photo_data.to_model_input(crop))
            latent = mu if model.quantizer is None else model.quantize(mu).z_continuous
            continuous = photo_data.to_uint8(model.decoder(latent))
        psnr_continuous.append(image_metrics(crop[0], continuous[0])["psnr"])
        if model.quantizer is None:
            kl.append(kl_bits_per_token(mu, logvar, model.cfg.token_dim).flatten().numpy())
    p = np.array(list(counts.values()), dtype=np.float64)
    p /= p.sum()
    codes = round(2**bits)  # 64,000 for FSQ
    out = {"codes": codes, "codebook_usage": len(counts) / codes, "perplexity": float(2 ** -(p * np.log2(p)).sum()),
           "psnr_continuous": float(np.mean(psnr_continuous)), "kl_bits_per_token": None}
    if kl:
        kl = np.concatenate(kl)
        budget = model.cfg.codebook_bits  # log2 K of GQ's codebook
        out.update(kl_bits_per_token=float(kl.mean()), kl_p5=float(np.percentile(kl, 5)),
                   kl_p95=float(np.percentile(kl, 95)), kl_within_half_bit=float((np.abs(kl - budget) <= 0.5).mean()))
    return out


def evaluate_run(run: Path, data: Path, paths: list[Path], cache: Path, sizes, tokenbridge: bool = False) -> dict:
    """One run's row; tokenbridge: its latents through TokenBridge (2 levels per channel, 1 bit each: at 16
    channels the same 16 bits per position as a 16-bit token) instead of GQ, the method named NAME+tokenbridge.
    Rows are kept in CACHE (NAME[+tokenbridge].row.json) and reused while the run's step, the photos and the
    sizes are the same: the study is evaluated again as each run finishes, and one row costs minutes."""
    from gqtok.training.evaluate import evaluate_tokenizer, run_tokenizer
    from gqtok.training.train import load_run

    config = json.loads((run / "config.json").read_text())
    key = {"version": 4, "step": config["step"], "photos": [p.name for p in paths], "sizes": [list(s) for s in sizes]}
    cached = cache / f"{run.name}{'+tokenbridge' if tokenbridge else ''}.row.json"
    if cached.exists() and (stored := json.loads(cached.read_text()))["key"] == key:
        return stored["row"]
    token_path = {"method": "tokenbridge" if tokenbridge else "auto", "tokenbridge_levels": 2}
    measured = frozen(run, data, cache)
    tokenize, detokenize, bits = run_tokenizer(measured, **token_path)
    tokenize = remembering(tokenize)  # token_statistics asks again for the crops that evaluate_tokenizer measured
    model, _ = load_run(measured)
    method = re.sub(r"_s\d+$", "", run.name) + ("+tokenbridge" if tokenbridge else "")
    row = {"run": run.name, "method": method, "seed": config["train"]["seed"],
           "quantizer": config["model"]["quantizer"], "token_dim": config["model"]["token_dim"],
           "bits_per_token": bits, "steps": config["step"], "cpu_hours": round(config.get("cpu_seconds", 0) / 3600, 2),
           "sizes": {}}
    for size in sizes:
        r = evaluate_tokenizer(tokenize, detokenize, paths, size, bits, name=run.name, classic=False,
                               progress=False, fd=True, greyed=False)
        stats = {"images": r["images"], "bpp": r["bpp"], **{m: r["tokens"][m] for m in METRICS},
                 "fd_effnet_lite0": r["fd_effnet_lite0"]["tokens"],
                 **token_statistics(model, tokenize, bits, paths, size)}
        stats["quantization_cost_db"] = stats["psnr_continuous"] - stats["psnr"]  # the latent unquantized - tokens
        row["sizes"][f"{size[0]}x{size[1]}"] = stats
    # a control on the frozen norms: at the training crop's size, where GroupNorm sees what it saw in training,
    # the run as trained against the run measured above (does freezing favour one method?)
    crop = (config["train"]["crop"],) * 2

    def at_crop(tokenize, detokenize) -> dict:
        r = evaluate_tokenizer(tokenize, detokenize, paths, crop, bits, name=run.name, classic=False, progress=False,
                               greyed=False)
        return {m: r["tokens"][m] for m in ("psnr", "colour_shift")}

    frozen_norms = at_crop(tokenize, detokenize)
    as_trained = frozen_norms if measured == run else at_crop(*run_tokenizer(run, **token_path)[:2])
    row["at_training_crop"] = {"size": f"{crop[0]}x{crop[1]}", "frozen_norms": frozen_norms, "as_trained": as_trained}
    cached.write_text(json.dumps({"key": key, "row": row}, indent=1) + "\n")
    return row


def classic_reference(paths: list[Path], sizes, rates: list[float], cache: Path) -> dict:
    """Pillow's JPEG and WebP on the same crops at each rate the learned methods have (each crop at the highest
    quality that stays at or under the rate, quality 1 where none does: the bpp is the one measured): the plot's
    anchors. {size: {"jpeg@R": {bpp, psnr, ssim, ms_ssim}}},
    kept in CACHE/classic.json while the photos, sizes and rates are the same."""
    from gqtok import photos as photo_files
    from gqtok.training.evaluate import classic_at_bpp, image_metrics

    key = {"photos": [p.name for p in paths], "sizes": [list(s) for s in sizes], "rates": rates}
    cached = cache / "classic.json"
    if cached.exists() and (stored := json.loads(cached.read_text()))["key"] == key:
        return stored["reference"]
    reference = {}
    for size in sizes:
        crops = [photo_files.center_crop(img, size) for img in map(photo_files.load_rgb, paths)
                 if img.shape[0] >= size[0] and img.shape[1] >= size[1]]
        out = reference[f"{size[0]}x{size[1]}"] = {}
        for fmt in ("JPEG", "WEBP"):
            for rate in rates:
                measured = []
                for crop in crops:
                    decoded, bpp, _ = classic_at_bpp(np.ascontiguousarray(crop), fmt, rate)
                    measured.append({"bpp": bpp, **image_metrics(crop, decoded)})
                out[f"{fmt.lower()}@{rate:g}"] = {  # MS-SSIM: None on crops under its smallest side
                    m: float(np.mean(v)) if (v := [r[m] for r in measured if r[m] is not None]) else None
                    for m in ("bpp", "psnr", "ssim", "ms_ssim")}
    cache.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps({"key": key, "reference": reference}, indent=1) + "\n")
    return reference


def training_log(run: Path) -> list[dict]:
    """A run's log.jsonl, a record per logged step: a run resumed from a checkpoint logs again the steps it had
    logged after it, and the later record counts."""
    log_file = run / "log.jsonl"
    log = [json.loads(line) for line in log_file.read_text().splitlines() if line.strip()] if log_file.exists() else []
    return sorted({r["step"]: r for r in log}.values(), key=lambda r: r["step"])


def plain_kl_calibration(calibration: Path, reference: Path, window: tuple[int, int] = (600, 800)) -> dict:
    """How the plain-KL weight was chosen (tools/train_quality.sh): each short run in CALIBRATION (a fixed KL
    weight, the first steps of the study's schedule) against the TDC run REFERENCE, by the training batches' KL
    per token averaged over the logged steps in WINDOW; the chosen weight is the one nearest the reference's.
    A run not yet past the window is listed as unfinished."""
    def over_window(run: Path, log: list[dict]) -> dict:
        rows = [r for r in log if window[0] <= r["step"] <= window[1]]
        if not rows:
            raise ValueError(f"{run} has no logged step in {window[0]}-{window[1]}")
        return {m: float(np.mean([r[m] for r in rows])) for m in ("kl_mean", "kl_max", "psnr")}

    weights, unfinished = {}, []
    for run in sorted(p for p in calibration.iterdir() if (p / "config.json").exists()):
        log = training_log(run)
        if not log or log[-1]["step"] < window[1]:
            unfinished.append(run.name)  # still short of the window's end: not compared yet
            continue
        weights[json.loads((run / "config.json").read_text())["train"]["kl_weight"]] = over_window(run, log)
    target = over_window(reference, training_log(reference))
    chosen = min(weights, key=lambda w: abs(weights[w]["kl_mean"] - target["kl_mean"])) if weights else None
    return {"window": list(window), "reference": {"run": reference.name, **target},
            "weights": {f"{w:g}": v for w, v in sorted(weights.items(), reverse=True)},
            "chosen": None if chosen is None else f"{chosen:g}", "unfinished": unfinished}


def calibration_table(calibrated: dict) -> str:
    lo, hi = calibrated["window"]
    lines = [f"| plain-KL weight (steps {lo}-{hi}) | KL bits/token | largest in a batch | training PSNR (dB) |",
             "| --- | --- | --- | --- |"]
    ref = calibrated["reference"]
    rows = [(f"TDC reference rule ({ref['run']})", ref)]
    rows += [(w + (" (chosen)" if w == calibrated["chosen"] else ""), v) for w, v in calibrated["weights"].items()]
    lines += [f"| {name} | {v['kl_mean']:.2f} | {v['kl_max']:.1f} | {v['psnr']:.2f} |" for name, v in rows]
    return "\n".join(lines)


def by_method(rows: list[dict]) -> dict:
    """Each method's mean and spread (max - min) over its seeds, per size and metric."""
    out = {}
    for method in sorted({r["method"] for r in rows}):
        group = [r for r in rows if r["method"] == method]
        out[method] = {"seeds": sorted(r["seed"] for r in group),
                       "steps": "/".join(sorted({str(r["steps"]) for r in group})),
                       "cpu_hours": "/".join(f"{r['cpu_hours']:.2f}" for r in group),
                       "bpp": next(iter(group[0]["sizes"].values()))["bpp"]}  # the rate: the same at every size
        for size in group[0]["sizes"]:
            stats = {}
            for m in (*METRICS, "fd_effnet_lite0", "codebook_usage", "kl_bits_per_token", "psnr_continuous",
                      "quantization_cost_db"):
                values = [r["sizes"][size][m] for r in group if r["sizes"][size].get(m) is not None]
                if values:
                    stats[m] = {"mean": float(np.mean(values)), "spread": float(np.ptp(values))}
            out[method][size] = stats
        out[method]["at_training_crop_psnr"] = {  # the frozen-norms control: as trained, frozen
            how: float(np.mean([r["at_training_crop"][how]["psnr"] for r in group]))
            for how in ("as_trained", "frozen_norms")}
    return out


def table(summary: dict, size: str, classic: dict) -> str:
    lines = [f"| method ({size}) | seeds | steps | CPU-h | bpp | PSNR (dB) | SSIM | MS-SSIM | FD-EffNetLite0 | "
             "colour shift | codebook usage | KL bits/token | PSNR unquantized (dB) | quantization cost (dB) | "
             "PSNR at the training crop: as trained / frozen |", "| --- " * 15 + "|"]

    def cell(stats, m, fmt):
        if m not in stats:
            return "-"
        s = stats[m]
        return f"{s['mean']:{fmt}}" + (f" (±{s['spread'] / 2:{fmt}})" if s["spread"] else "")

    for method, s in summary.items():
        st, control = s.get(size, {}), s["at_training_crop_psnr"]
        lines.append(f"| {method} | {len(s['seeds'])} | {s['steps']} | {s['cpu_hours']} | {s['bpp']:.3f} | "
                     f"{cell(st, 'psnr', '.2f')} | {cell(st, 'ssim', '.4f')} | {cell(st, 'ms_ssim', '.4f')} | "
                     f"{cell(st, 'fd_effnet_lite0', '.1f')} | {cell(st, 'colour_shift', '.2f')} | "
                     f"{cell(st, 'codebook_usage', '.3f')} | {cell(st, 'kl_bits_per_token', '.2f')} | "
                     f"{cell(st, 'psnr_continuous', '.2f')} | {cell(st, 'quantization_cost_db', '.2f')} | "
                     f"{control['as_trained']:.2f} / {control['frozen_norms']:.2f} |")
    for name, c in classic.items():  # Pillow's codecs on the same crops: figures the learned rows can be read against
        ms_ssim = "-" if c["ms_ssim"] is None else f"{c['ms_ssim']:.4f}"
        lines.append(f"| {name} (Pillow) | - | - | - | {c['bpp']:.3f} | {c['psnr']:.2f} | {c['ssim']:.4f} | "
                     f"{ms_ssim} |" + " - |" * 7)
    return "\n".join(lines)


def quick_data(data: Path, root: Path, n: int = 8) -> Path:
    """A folder of links to N of DATA's training photos, for --quick: every training run (and frozen-norm pass)
    decodes all its photos first, which at 250 photos took most of the quick mode's time."""
    from gqtok.photos import list_images, split_heldout

    out = root / "_data"
    if not out.is_dir():
        out.mkdir(parents=True)
        for photo in split_heldout(list_images(data))[0][:n]:
            (out / photo.name).symlink_to(photo.resolve())
    return out


def quick_runs(root: Path, data: Path) -> None:
    """Three tiny runs (GQ + TDC, FSQ, plain KL) trained here in seconds: the harness end to end, not a verdict."""
    from gqtok.training.train import train

    for name, settings in (("gq_tdc_s0", {}), ("fsq_s0", {"quantizer": "fsq", "latent_channels": 6, "token_dim": 6}),
                           ("plain_kl_s0", {"kl_mode": "fixed", "kl_weight": 1e-4})):
        if not (root / name / "model.safetensors").exists():
            train(root / name, data, "tiny", {"steps": 10, "image_every": 0, **settings}, progress=False)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default=None, help="default runs/quality32 (--quick: runs/quality-quick)")
    ap.add_argument("--photos", default=str(REPO / "data" / "photos"), help="the sources held out whole")
    ap.add_argument("--data", default=str(REPO / "data" / "endless-sky"), help="training photos (norm statistics)")
    ap.add_argument("--quick", action="store_true", help="three tiny runs trained here, 4 photos at 64x64 (< 60 s)")
    ap.add_argument("--calibration", default=str(REPO / "runs" / "quality32-calib"),
                    help="the plain-KL weight's calibration runs (tools/train_quality.sh), reported when present")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    from gqtok.cli import collect_photos

    start = time.monotonic()
    runs_dir = Path(args.runs or REPO / "runs" / ("quality-quick" if args.quick else "quality32"))
    sizes, paths = SIZES, collect_photos([args.photos], "all")
    if args.quick:
        sizes, paths = ((64, 64),), paths[:4]
        args.data = quick_data(Path(args.data), runs_dir)
        quick_runs(runs_dir, args.data)
    runs_dir.mkdir(parents=True, exist_ok=True)
    runs = sorted(p for p in runs_dir.iterdir() if (p / "config.json").exists() and not p.name.startswith("_"))
    progress = {r: finished(r) for r in runs}
    done = [r for r, (reached, asked) in progress.items() if reached >= asked]
    out = Path(args.out or RESULTS / f"quality{'_quick' if args.quick else ''}.json")
    committed = earlier_result(out)
    done_names = {r.name for r in done}
    carried = [r for r in committed.get("rows", []) if r["run"] not in done_names]
    carried_names = {r["run"] for r in carried}
    unfinished = {r.name: "step {} of {}".format(*progress[r]) for r in runs
                  if r.name not in done_names | carried_names}
    rows = []
    for run in done:
        plain_kl = json.loads((run / "config.json").read_text())["train"]["kl_mode"] == "fixed"
        for tokenbridge in (False, True) if plain_kl else (False,):
            rows.append(evaluate_run(run, Path(args.data), paths, runs_dir / "_frozen", sizes, tokenbridge))
            print(f"{rows[-1]['method']} seed {rows[-1]['seed']}: "
                  + ", ".join(f"{s} {v['psnr']:.2f} dB" for s, v in rows[-1]["sizes"].items()), flush=True)
    rows += carried
    summary = by_method(rows)
    rates = sorted({nominal_rate(s["bpp"]) for s in summary.values()})
    reference = classic_reference(paths, sizes, rates, runs_dir / "_frozen") if rates else {}
    calibration, tdc_reference = Path(args.calibration), runs_dir / "gq_tdc_s0"
    calibrated = plain_kl_calibration(calibration, tdc_reference) \
        if calibration.is_dir() and (tdc_reference / "log.jsonl").exists() and not args.quick \
        else committed.get("plain_kl_calibration")
    gaussian = [r for r in runs if json.loads((r / "config.json").read_text())["model"]["quantizer"] == "gq"]
    curves = {**committed.get("rate_curves", {}), **rate_curves(gaussian)}
    result = {"benchmark": "quality", "quick": args.quick, "runs": str(runs_dir.relative_to(REPO))
              if runs_dir.is_relative_to(REPO) else str(runs_dir), "photos": len(paths),
              "sizes": [f"{h}x{w}" for h, w in sizes], "unfinished": unfinished, "rows": rows, "by_method": summary,
              "carried_over": sorted(r["run"] + ("+tokenbridge" if r["method"].endswith("+tokenbridge") else "")
                                     for r in carried),
              "classic": reference, "plain_kl_calibration": calibrated, "rate_curves": curves,
              "seconds": round(time.monotonic() - start, 1)}
    for size in result["sizes"]:
        print(table(summary, size, reference.get(size, {})))
    if unfinished:
        print("unfinished:", unfinished)
    path = write_result(result, "quality", args.quick, out)
    tables = [table(summary, size, reference.get(size, {})) for size in result["sizes"]]
    path.with_suffix(".md").write_text("\n\n".join(tables + ([calibration_table(calibrated)] if calibrated else []))
                                       + "\n")
    if summary:
        plot(summary, reference, result["sizes"], path.with_suffix(".png"))
    if curves:
        plot_rate_control(curves, path.with_name(path.stem + "_rate_control.png"))
    return result


def earlier_result(path: Path) -> dict:
    """The committed result at PATH (empty when there is none): what runs gone from runs/ leave behind."""
    return json.loads(path.read_text()) if path.exists() else {}


def plot(summary: dict, classic: dict, sizes: list[str], out: Path) -> None:
    """Rate-distortion: each method's mean PSNR at its bpp, a bar for its seed spread, and JPEG and WebP on the
    same crops (lines), one panel per size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 4.5), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        points = []
        for method, s in summary.items():
            st = s.get(size, {}).get("psnr")
            if st is None:
                continue
            ax.errorbar([s["bpp"]], [st["mean"]], yerr=[st["spread"] / 2], fmt="o", capsize=4, label=method)
            points.append((s["bpp"], st["mean"], method))
        ys = [y for _, y, _ in points] + [c["psnr"] for c in classic.get(size, {}).values()]
        for (x, y, method), label_y in zip(points, spread_labels(points, 0.045 * (max(ys) - min(ys)))):
            ax.annotate(method, (x, y), xytext=(x + 0.012, label_y), fontsize=7, va="center",
                        arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "0.5"} if abs(label_y - y) > 0.05 else None)
        for fmt, label, style in (("jpeg", "JPEG", "k--"), ("webp", "WebP", "k:")):
            points = sorted((c["bpp"], c["psnr"]) for name, c in classic.get(size, {}).items()
                            if name.startswith(fmt + "@"))
            if points:
                ax.plot(*zip(*points), style, marker="x", lw=0.8, label=f"{label} (Pillow), same crops")
                ax.annotate(label, points[-1], textcoords="offset points", xytext=(5, 3), fontsize=7)
        # from 0 and with room for the labels: one rate alone would be stretched across the whole axis
        ax.set_xlim(0, 1.3 * max(s["bpp"] for s in summary.values()))
        ax.set(title=f"{size} centre crops, sources held out whole", xlabel="bits per pixel", ylabel="PSNR (dB)")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def nominal_rate(bpp: float) -> float:
    """A method's rate to the nearest 1/64 bpp, the rate it was built for: FSQ's 0.249 bpp is 0.25."""
    return round(bpp * 64) / 64


def spread_labels(points: list[tuple[float, float, str]], gap: float) -> list[float]:
    """Label heights for (bpp, PSNR, name) points: labels of points at one nominal rate closer than GAP are
    stacked GAP apart, each stack centred on its points, so that methods a few tenths of a dB apart stay readable;
    a label with room keeps its point's height."""
    heights = [y for _, y, _ in points]
    rates: dict[float, list[int]] = {}
    for i, (x, _, _) in enumerate(points):
        rates.setdefault(nominal_rate(x), []).append(i)
    for members in rates.values():
        members.sort(key=lambda i: points[i][1])
        stacks = [[members[0]]]
        for i in members[1:]:
            top = points[stacks[-1][0]][1] + gap * (len(stacks[-1]) - 1)  # the stack's top label, before centring
            if points[i][1] < top + gap:
                stacks[-1].append(i)
            else:
                stacks.append([i])
        for stack in stacks:
            centre = sum(points[i][1] for i in stack) / len(stack)
            for k, i in enumerate(stack):
                heights[i] = centre + gap * (k - (len(stack) - 1) / 2)
    return heights


def rate_curves(runs: list[Path]) -> dict:
    """Each Gaussian VAE's training log (finished or not) as the rate-control plot's series: per logged step the
    batch's mean and largest KL per token and TDC's lam (a plain-KL run: its fixed weight), and the steps the run
    asks for (a curve that stops short is unfinished); kept in quality.json so that the plot outlives the runs."""
    curves = {}
    for run in runs:
        config, log = json.loads((run / "config.json").read_text()), training_log(run)
        if log:  # else not yet at its first logged step
            curves[run.name] = {"codebook_bits": config["model"]["codebook_bits"], "steps": config["train"]["steps"],
                                "step": [r["step"] for r in log], "kl_mean": [r["kl_mean"] for r in log],
                                "kl_max": [r["kl_max"] for r in log],
                                "lam": [r.get("lam", config["train"]["kl_weight"]) for r in log]}
    return curves


def plot_rate_control(curves: dict, out: Path) -> None:
    """The runs' KL per token (mean and largest in a batch) against log2 K, and TDC's lam, over the steps: whether
    the rate settled. A curve short of its run's steps says so in the legend (a run still training, or one
    carried over from the committed result that was gone before it finished)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (kl_ax, lam_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (name, c) in enumerate(sorted(curves.items())):
        colour, marker = f"C{i % 10}", "o" if len(c["step"]) < 3 else None  # a line of one point shows nothing
        label = f"{name} (unfinished)" if c["step"][-1] < c.get("steps", 0) else name
        kl_ax.plot(c["step"], c["kl_mean"], color=colour, marker=marker, label=f"{label} mean")
        kl_ax.plot(c["step"], c["kl_max"], color=colour, ls=":", lw=0.8)
        lam_ax.semilogy(c["step"], c["lam"], color=colour, marker=marker, label=label)
    for bits in sorted({c["codebook_bits"] for c in curves.values()}):
        kl_ax.axhline(bits, color="k", lw=0.8)
    kl_ax.set(title="KL per token in training batches (dotted: largest; line: log2 K)", xlabel="step",
              ylabel="bits")
    lam_ax.set(title="TDC's lam (plain KL: its fixed weight)", xlabel="step", ylabel="lam")
    for ax in (kl_ax, lam_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
