#!/usr/bin/env bash
# Issue 31's grey target (chroma of grey pictures at most 0.6; 0.4.0 gives 1.2-1.3): fine-tunes of the default
# model 0.4.0 (fixed norms, kept) with the opponent-colour term (--chroma-weight) and a third of the crops grey,
# on one thread. Resumable: run it again after an interruption.
#   bash tools/train_chroma.sh            end to end, posterior samples, chroma weight 2, 1,500 steps (0.27 CPU-h;
#                                         measured, not shipped: docs/results.md)
#   bash tools/train_chroma.sh tokens     the decoder alone on GQ's tokens (--decoder-on-tokens: what it decodes
#                                         in service; the grey photos' chroma was 0.74 from posterior means and
#                                         1.19 from tokens), chroma weight 4, 1,500 steps
# Then measure (NAME: chroma or chroma-tokens):
#   gqtok export runs/NAME --out runs/NAME-model --model-id gqtok-default
#   gqtok eval runs/NAME-model --photos data/photos --split all --size 512 768 --size 256 256
# against benchmarks/results/colour_fixed_norm.json (grey_chroma, greyed_chroma, colour_shift, PSNR).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
GQTOK=${GQTOK:-.venv/bin/gqtok}
source tools/resume_run.sh
COMMON=(--preset default --init-from default --lr 1e-4 --warmup-steps 50 --colour-weight 4 --grey-prob 0.33
        --dark-prob 0.1 --image-every 500)
case "${1:-}" in
  "") resume_or_start runs/chroma 1500 runs/chroma.out "${COMMON[@]}" --tdc-lam-init 1e-6 --chroma-weight 2 ;;
  tokens) resume_or_start runs/chroma-tokens 1500 runs/chroma-tokens.out "${COMMON[@]}" --decoder-on-tokens true \
            --chroma-weight 4 ;;
  *) echo "usage: $0 [tokens]" >&2; exit 2 ;;
esac
