#!/usr/bin/env bash
# Issue 31's 256-token model: the f16 preset (one 16-bit token per 16x16 patch), grown from the default model's
# weights, on one thread (the issue allows 6 CPU-hours; the runs' cpu_seconds in config.json and log.jsonl count
# them). Two phases:
#   1. runs/f16: GroupNorm, the preset's 24,000-step schedule, stopped at step 7,126 (when the size dependence of
#      GroupNorm was found: training/model.py);
#   2. runs/f16-fixed: its norms frozen (--norm fixed, statistics measured on training crops), 10,000 more steps.
# Resumable: run it again after an interruption.
#   bash tools/train_f16.sh
# Logs in runs/f16.out and runs/f16-fixed.out; ships with
#   gqtok export runs/f16-fixed --out models/f16 --model-id gqtok-f16 --no-weights
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
GQTOK=${GQTOK:-.venv/bin/gqtok}
source tools/resume_run.sh
RESUME_ARGS="--stop-at 7126" resume_or_start runs/f16 24000 runs/f16.out --preset f16 --image-every 2000 --stop-at 7126
resume_or_start runs/f16-fixed 10000 runs/f16-fixed.out --preset f16 --init-from runs/f16 --norm fixed --lr 3e-4 \
  --warmup-steps 100 --tdc-lam-init 3e-8 --image-every 2000
