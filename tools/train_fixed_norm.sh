#!/usr/bin/env bash
# Issue 31's colour and full-size fix: the default model with its GroupNorm statistics frozen (norm "fixed",
# training/model.py FixedGroupNorm), measured on training crops at the start, then fine-tuned 2,000 steps with
# grey and dark crops and the low-frequency colour term (about 0.35 CPU-hours on one thread). TDC's weight starts
# low (1e-6), as in every fine-tune. Resumable: run it again after an interruption. Then measure before adopting:
#   gqtok export runs/fixed-norm --out runs/fixed-norm-model --model-id gqtok-default
#   gqtok eval runs/fixed-norm-model --photos data/photos --split all --size 512 768 --size 256 256
# and compare with benchmarks/results/colour_default.json (colour_shift, grey_chroma, PSNR, KL per token).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
GQTOK=${GQTOK:-.venv/bin/gqtok}
source tools/resume_run.sh
resume_or_start runs/fixed-norm 2000 runs/fixed-norm.out --preset default --init-from default --norm fixed \
  --lr 2e-4 --warmup-steps 100 --tdc-lam-init 1e-6 --colour-weight 4 --grey-prob 0.1 --dark-prob 0.1 \
  --image-every 1000
