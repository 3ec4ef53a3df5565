# Sourced by the training scripts: resume_or_start DIR STEPS LOG [gqtok train options for a new run...]
# resumes the run in DIR up to STEPS if it has a checkpoint, else starts it afresh with the options; logs to LOG.
# RESUME_ARGS (optional): training settings given on a resume as well, e.g. RESUME_ARGS="--stop-at 7126".
resume_or_start() {
  local dir=$1 steps=$2 log=$3; shift 3
  if [ -f "$dir/trainer.pt" ]; then
    # shellcheck disable=SC2086  # RESUME_ARGS is a list of words
    "$GQTOK" train --out "$dir" --resume --steps "$steps" --quiet ${RESUME_ARGS:-} >> "$log" 2>&1
  else
    rm -rf "$dir"
    "$GQTOK" train --out "$dir" --steps "$steps" --ckpt-every 250 --quiet "$@" >> "$log" 2>&1
  fi
}
