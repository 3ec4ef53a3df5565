#!/usr/bin/env bash
# Issue 31's 256-token model: the f16 preset (one 16-bit token per 16x16 patch), grown from the default model's
# weights, 24,000 steps on one thread (the issue allows 6 CPU-hours; the run's cpu_seconds in config.json and
# log.jsonl count them). Resumable: run it again after an interruption.
#   bash tools/train_f16.sh
# The run goes to runs/f16 (log runs/f16.out); `gqtok export runs/f16 --out models/f16 --model-id gqtok-f16` ships it.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
GQTOK=${GQTOK:-.venv/bin/gqtok}
source tools/resume_run.sh
resume_or_start runs/f16 24000 runs/f16.out --preset f16 --image-every 2000
