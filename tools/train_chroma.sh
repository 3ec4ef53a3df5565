#!/usr/bin/env bash
# Issue 31's grey target (chroma of grey pictures at most 0.6; 0.4.0 gives 1.2-1.3): a fine-tune of the default
# model 0.4.0 (fixed norms, kept) with the opponent-colour term (--chroma-weight) and a third of the crops grey,
# 1,500 steps on one thread (about 0.3 CPU-hours). Resumable: run it again after an interruption. Then measure:
#   gqtok export runs/chroma --out runs/chroma-model --model-id gqtok-default
#   gqtok eval runs/chroma-model --photos data/photos --split all --size 512 768 --size 256 256
# against benchmarks/results/colour_fixed_norm.json (grey_chroma, greyed_chroma, colour_shift, PSNR).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
GQTOK=${GQTOK:-.venv/bin/gqtok}
source tools/resume_run.sh
resume_or_start runs/chroma 1500 runs/chroma.out --preset default --init-from default --lr 1e-4 --warmup-steps 50 \
  --tdc-lam-init 1e-6 --colour-weight 4 --chroma-weight 2 --grey-prob 0.33 --dark-prob 0.1 --image-every 500
