"""Plot a training run's learning curve against CPU time: training-crop PSNR from RUN/log.jsonl (not held-out).

    python tools/learning_curve.py RUN --out docs/default_model_curve.png [--cpu-at STEP:SECONDS] [--mark LABEL:CPU_H:PSNR]

Each log line carries `cpu_s`, the CPU-seconds of every thread since the run began (kept across resumes). Lines
logged before that field existed get it by proportion from `--cpu-at` (a step whose CPU time is known); they are
drawn dashed. `--mark` adds a measured point, e.g. a held-out evaluation, as a labelled dot.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def main(argv=None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cpu-at", help="STEP:CPU_SECONDS for lines without cpu_s")
    ap.add_argument("--mark", action="append", default=[], help="LABEL:CPU_HOURS:PSNR, repeatable")
    ap.add_argument("--smooth", type=int, default=9, help="rolling median over this many log lines")
    args = ap.parse_args(argv)
    rows = [json.loads(line) for line in (args.run / "log.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "psnr" in r]
    per_step = None
    if args.cpu_at:
        step, seconds = args.cpu_at.split(":")
        per_step = float(seconds) / int(step)
    hours, psnr, estimated = [], [], []
    for r in rows:
        if "cpu_s" in r:
            hours.append(r["cpu_s"] / 3600)
            estimated.append(False)
        elif per_step is not None:
            hours.append(r["step"] * per_step / 3600)
            estimated.append(True)
        else:
            continue
        psnr.append(r["psnr"])
    hours, psnr, estimated = np.array(hours), np.array(psnr), np.array(estimated)
    k = max(1, args.smooth)
    smooth = np.array([np.median(psnr[max(0, i - k // 2):i + k // 2 + 1]) for i in range(len(psnr))])
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(hours, psnr, color="0.8", lw=0.8, label="training crops, per log line")
    ax.plot(np.where(estimated, hours, np.nan), np.where(estimated, smooth, np.nan), "C0--", lw=1.5)
    ax.plot(np.where(~estimated, hours, np.nan), np.where(~estimated, smooth, np.nan), "C0-", lw=1.5,
            label=f"rolling median of {k}")
    for mark in args.mark:
        label, h, p = mark.rsplit(":", 2)
        ax.plot([float(h)], [float(p)], "o", color="C3")
        ax.annotate(label, (float(h), float(p)), textcoords="offset points", xytext=(5, -12), fontsize=8)
    ax.set_xlabel("CPU-hours (all threads)")
    ax.set_ylabel("PSNR (dB)")
    ax.set_title(f"{args.run.name}: learning curve")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out} ({len(psnr)} points, {estimated.sum()} with estimated CPU time)")


if __name__ == "__main__":
    main()
