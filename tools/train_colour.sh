#!/usr/bin/env bash
# Issue 31's colour fine-tune of the default model: its weights, 3,000 steps (about 0.5 CPU-hours on one thread)
# with the low-frequency colour term and grey and dark crops (training/train.py colour_weight, grey_prob,
# dark_prob). TDC's weight starts low (1e-6): a fine-tune does not inherit the source's, and the default 1e-4
# pulled KL from 16 to 7 bits per token in 150 steps. Resumable: run it again after an interruption. Then
# measure before adopting it:
#   gqtok export runs/colour --out runs/colour-model --model-id gqtok-default
#   gqtok eval runs/colour-model --photos data/photos --split all --size 512 768 --size 256 256
# and compare with benchmarks/results/colour_default.json (colour_shift, grey_chroma, PSNR).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
GQTOK=${GQTOK:-.venv/bin/gqtok}
source tools/resume_run.sh
resume_or_start runs/colour 3000 runs/colour.out --preset default --init-from default --lr 2e-4 --warmup-steps 100 \
  --tdc-lam-init 1e-6 --colour-weight 4 --grey-prob 0.1 --dark-prob 0.1 --image-every 1000
