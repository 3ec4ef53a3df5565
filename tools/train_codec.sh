#!/usr/bin/env bash
# The discretized-VAE codec's trainings (issue 29), one thread each, resumable: run it again after an interruption.
#   bash tools/train_codec.sh variable   one model, six rate levels (the codec preset), 24,000 steps
#   bash tools/train_codec.sh singles    one lambda per model at two of those lambdas, 4,000 steps each: the same
#                                        CPU time per rate as the variable model (a sixth of it), to choose by
#   bash tools/train_codec.sh fixed      the variable model's norms frozen (--norm fixed, training/model.py) at
#                                        the step it reached (18,559), then 2,000 steps (the size-independent codec)
#   bash tools/train_codec.sh wide       the fixed codec widened from 16 to 48 latent channels (the 16 cap the
#                                        rate: at lambda 0.7 it reached its unquantized ceiling) with four more
#                                        rate levels above its six (lambda 0.093 to 0.7: issue 29's span up to
#                                        0.8 bpp), 3,000 steps (training/codec.py widened_state, resampled_gains);
#                                        measured and not shipped: docs/results.md, the discretized-VAE codec
#   bash tools/train_codec.sh wide2      the wide codec 2,500 steps more at a lower learning rate, with an eleventh
#                                        level (lambda 1.4): its top level stopped at 0.74 bpp, short of the 0.8
# Runs go to runs/codec-*; logs to runs/codec-*.out.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
GQTOK=${GQTOK:-.venv/bin/gqtok}
source tools/resume_run.sh

case "${1:-}" in
  variable) resume_or_start runs/codec-variable 24000 runs/codec-variable.out --preset codec --image-every 2000 ;;
  singles)
    for lam in 0.0035 0.025; do
      resume_or_start "runs/codec-single-$lam" 4000 "runs/codec-single-$lam.out" --preset codec --image-every 2000 \
        --rate-lambdas "$lam"
    done ;;
  fixed)
    resume_or_start runs/codec-fixed 2000 runs/codec-fixed.out --preset codec --init-from runs/codec-variable \
      --norm fixed --lr 1.5e-4 --warmup-steps 100 --image-every 2000 ;;
  wide)
    resume_or_start runs/codec-wide 3000 runs/codec-wide.out --preset codec --init-from runs/codec-fixed \
      --latent-channels 48 --rate-lambdas 0.0018,0.0035,0.0067,0.013,0.025,0.0483,0.093,0.18,0.35,0.7 \
      --lr 3e-4 --warmup-steps 100 \
      --image-every 2000 ;;
  wide2)
    resume_or_start runs/codec-wide2 2500 runs/codec-wide2.out --preset codec --init-from runs/codec-wide \
      --latent-channels 48 --rate-lambdas 0.0018,0.0035,0.0067,0.013,0.025,0.0483,0.093,0.18,0.35,0.7,1.4 \
      --lr 1.5e-4 --warmup-steps 100 --image-every 2500 ;;
  *) echo "usage: $0 variable|singles|fixed|wide|wide2" >&2; exit 2 ;;
esac
