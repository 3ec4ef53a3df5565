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
dir=runs/f16
if [ -f "$dir/trainer.pt" ]; then
  "$GQTOK" train --out "$dir" --resume --steps 24000 --quiet >> runs/f16.out 2>&1
else
  rm -rf "$dir"
  "$GQTOK" train --preset f16 --out "$dir" --ckpt-every 250 --image-every 2000 --quiet >> runs/f16.out 2>&1
fi
