#!/usr/bin/env bash
# The discretized-VAE codec's trainings (issue 29), one thread each, resumable: run it again after an interruption.
#   bash tools/train_codec.sh variable   one model, six rate levels (the codec preset), 24,000 steps
#   bash tools/train_codec.sh singles    one lambda per model at two of those lambdas, 4,000 steps each: the same
#                                        CPU time per rate as the variable model (a sixth of it), to choose by
# Runs go to runs/codec-*; logs to runs/codec-*.out.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
GQTOK=${GQTOK:-.venv/bin/gqtok}

run() {  # run DIR STEPS [overrides...]: start, or resume what is there
  local dir=$1 steps=$2; shift 2
  if [ -f "$dir/trainer.pt" ]; then
    "$GQTOK" train --out "$dir" --resume --steps "$steps" --quiet
  else
    rm -rf "$dir"
    "$GQTOK" train --preset codec --out "$dir" --steps "$steps" --ckpt-every 250 --image-every 2000 --quiet "$@"
  fi
}

case "${1:-}" in
  variable) run runs/codec-variable 24000 >> runs/codec-variable.out 2>&1 ;;
  singles)
    for lam in 0.0035 0.025; do
      run "runs/codec-single-$lam" 4000 --rate-lambdas "$lam" >> "runs/codec-single-$lam.out" 2>&1
    done ;;
  *) echo "usage: $0 variable|singles" >&2; exit 2 ;;
esac
