#!/usr/bin/env bash
# Issue 32's trainings: GQ + TDC against FSQ (and the rest) on the default preset's network, 128x128 crops,
# 8,700 steps each, one after another on one thread: 1.5 CPU-hours at the 0.62 CPU-s per step that the first
# run measured here (a first try at 4,800 steps gave 0.83 CPU-hours, short of the 1.5 asked, and is kept
# aside in runs/quality32-4800). Resumable: run it again
# after an interruption and every run continues from its last checkpoint (finished runs are skipped).
#   bash tools/train_quality.sh            the queue below, in order
#   bash tools/train_quality.sh & bash tools/train_quality.sh &     both cores: each takes the next run that the
#                                          other does not hold (a lock file per run, flock)
#   THREADS=2 bash tools/train_quality.sh NAME    one run on both cores (torch's intra-op threads)
#   bash tools/train_quality.sh NAME...    only these runs (runs/ is not kept between working sessions here, so a
#                                          session trains what it can finish; benchmarks/quality.py keeps the rows
#                                          of runs that are gone from the committed quality.json)
# Runs go to runs/quality32/NAME (logs NAME.out); benchmarks/quality.py evaluates the finished ones
# (with their norms frozen, on the four sources held out whole, at 768x512 and 256x256).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${THREADS:-1} MKL_NUM_THREADS=${THREADS:-1}
GQTOK=${GQTOK:-.venv/bin/gqtok}
STEPS=${STEPS:-8700}
ROOT=runs/quality32
ONLY=" $* "

run() {  # run NAME [train overrides...]: start, resume, or skip when finished or held by another instance
  # (ROOT and STOP_AT, set in a subshell, put a run elsewhere and stop it early on the same schedule)
  local name=$1 dir=$ROOT/$1 lock stop_at=${STOP_AT:-0}; shift
  [ -z "${ONLY// }" ] || [[ "$ONLY" == *" $name "* ]] || return 0
  mkdir -p "$ROOT"
  exec {lock}>"$ROOT/$name.lock"
  flock -n "$lock" || { exec {lock}>&-; return 0; }
  if [ -f "$dir/trainer.pt" ]; then
    local done_steps
    done_steps=$(tail -n 1 "$dir/log.jsonl" 2>/dev/null | sed -n 's/.*"step": \([0-9]*\).*/\1/p')
    if [ "${done_steps:-0}" -lt "$(( stop_at > 0 ? stop_at : STEPS ))" ]; then
      "$GQTOK" train --out "$dir" --resume --steps "$STEPS" --stop-at "$stop_at" --quiet >> "$ROOT/$name.out" 2>&1
    fi
  else
    rm -rf "$dir"
    "$GQTOK" train --preset default --out "$dir" --steps "$STEPS" --stop-at "$stop_at" --ckpt-every 250 \
      --image-every 0 --quiet "$@" >> "$ROOT/$name.out" 2>&1
  fi
  exec {lock}>&-
}

# plain KL's weight: the first study's best (1e-5) gave 2.4 bits per token here, a seventh of log2 K, so the
# weight is calibrated first: the first 800 of the study's 8,700 steps (its schedule) at each weight, and the
# study trains the weight whose training KL per token over steps 600-800 is nearest to what TDC's reference rule
# reaches over the same steps (benchmarks/quality.py reports both: "plain_kl_calibration" in quality.json)
for w in 1e-5 1e-6 1e-7; do
  (ROOT=runs/quality32-calib STOP_AT=800; run "w$w" --kl-mode fixed --kl-weight "$w" --seed 0)
done

# the two methods with two seeds first (the verdict's noise), then the single-seed ones
run gq_tdc_floor3e-6_s0 --tdc-lam-floor 3e-6 --seed 0
run fsq_s0 --quantizer fsq --latent-channels 6 --token-dim 6 --seed 0
run gq_tdc_floor3e-6_s1 --tdc-lam-floor 3e-6 --seed 1
run fsq_s1 --quantizer fsq --latent-channels 6 --token-dim 6 --seed 1
run gq_tdc_s0 --seed 0
run plain_kl_1e-6_s0 --kl-mode fixed --kl-weight 1e-6 --seed 0     # plain KL, then GQ (and TokenBridge at eval)
run gq_tdc_d8_s0 --token-dim 8 --seed 0                            # 8-dim tokens: 0.5 bpp
run fsq_d12_s0 --quantizer fsq --latent-channels 12 --token-dim 6 --seed 0    # two FSQ tokens per position: 0.5 bpp
# VQ with the practitioners' remedies: EMA codebook, dead-code restarts, l2-normalized 8-dim lookup (LlamaGen)
run vq_remedies_s0 --quantizer vq --vq-remedies true --latent-channels 8 --token-dim 8 --seed 0
