#!/usr/bin/env bash
# The default recipe on a lent GPU (an H200 with torch and no network; 64 MiB travels there, files of at most
# 16 MiB come back). Three steps, two machines:
#
#   bash tools/gpu_train.sh prepare        # here: .gpu/photos, the training photos resized to fit what travels
#   (device run, carry [".gpu"])  bash tools/gpu_train.sh run   # there: <= 9 minutes, weights back in parts
#   bash tools/gpu_train.sh join FILES_AT   # here: the parts -> runs/gpu/, a run to eval, export or fine-tune from
#
# Same recipe as the CPU default model (the default preset, the same sources, the same sources left out), wider
# (base 48: the CPU study's +unshuffle-wide, which pays where compute is cheap), on 256 px crops, batch 64, bf16.
# Only the EMA weights come back (as the run's weights), so a 5.6 M-parameter model fits in two parts.
set -euo pipefail
cd "$(dirname "$0")/.."
GPU=.gpu
UNSEEN=(kphotoalbum lxqt-themes plasma-workspace-wallpapers tuxpaint-data)  # as the CPU default model (docs/results.md)
MINUTES=${MINUTES:-8}  # training time there; the schedule's steps are set from a short timed warm-up
WORK=${WORK:-}  # scratch folder there for the package, the warm-up and the run (default: a fresh mktemp -d)

prepare() {
  local py=${PYTHON:-.venv/bin/python}
  rm -rf "$GPU" && mkdir -p "$GPU/photos/endless-sky" "$GPU/photos/debian"
  local exclude=()
  for s in "${UNSEEN[@]}"; do exclude+=(--exclude-source "$s"); done
  "$py" -m gqtok.cli data list data/endless-sky --split train > "$GPU/endless.txt"
  "$py" -m gqtok.cli data list data/photos "${exclude[@]}" --split train > "$GPU/debian.txt"
  # resized copies: long side at most 1024 px (endless-sky: 720, its small package's size), JPEG quality 90
  "$py" - "$GPU" <<'EOF'
import sys
from pathlib import Path
from PIL import Image
gpu = Path(sys.argv[1])
for listing, folder, side in (("endless.txt", "endless-sky", 720), ("debian.txt", "debian", 1024)):
    for line in (gpu / listing).read_text().split():
        src = Path(line)
        with Image.open(src) as im:
            im = im.convert("RGB")
            im.thumbnail((side, side), Image.LANCZOS)
            im.save(gpu / "photos" / folder / f"{src.parent.name}__{src.stem}.jpg", quality=90)
EOF
  du -sh "$GPU"
  local mib=$(( $(du -sb "$GPU" | cut -f1) / 1048576 + $(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1) / 1048576 ))
  [ "$mib" -lt 62 ] || { echo "the working tree and $GPU come to ${mib} MiB: over the 64 MiB that travels" >&2; exit 1; }
}

run() {
  : "${OUT:?run this on the device machine, where OUT is set}"
  local work=${WORK:-$(mktemp -d)}
  python3 -m pip install -q --no-deps --no-build-isolation --no-index --target "$work/site" . >/dev/null
  export PYTHONPATH="$work/site" PYTHONUNBUFFERED=1
  local common=(--preset default --device cuda --precision bf16 --base-channels 48 --crop 256 --batch-size 64
                --data "$GPU/photos/endless-sky:1" --data "$GPU/photos/debian:1" --image-every 0 --log-every 50)
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
  # a short warm-up sets the steps: the cosine schedule must end when the time does
  python3 -m gqtok.cli train "${common[@]}" --out "$work/warmup" --steps 150 --ckpt-every 0 --lr-schedule constant
  local rate
  rate=$(python3 -c "import json; r=[json.loads(l) for l in open('$work/warmup/log.jsonl')]; a,b=r[0],r[-1]; \
print((b['step']-a['step'])/(b['time_s']-a['time_s']))")
  local steps
  steps=$(python3 -c "print(int($rate * 60 * $MINUTES))")
  echo "steps per second $rate -> $steps steps in $MINUTES minutes" | tee -a "$OUT/gpu.txt"
  python3 -m gqtok.cli train "${common[@]}" --out "$work/run" --steps "$steps" --warmup-steps $((steps / 20)) \
    --ckpt-every 1000 --time-limit-min $((MINUTES + 1))
  python3 - "$work/run" "$OUT" <<'EOF'
import json, shutil, sys
from pathlib import Path
from safetensors.torch import load_file, save_file
run, out = Path(sys.argv[1]), Path(sys.argv[2])
state = load_file(str(run / "model.safetensors"))
ema = {"model." + k[4:]: v for k, v in state.items() if k.startswith("ema.")}
ema.update({k: v for k, v in state.items() if k.startswith("tdc.")})
save_file(ema, str(out / "weights.safetensors"))
config = json.loads((run / "config.json").read_text())
config["train"]["ema_decay"] = 0.0  # the weights that came back are the EMA
(out / "config.json").write_text(json.dumps(config, indent=2))
shutil.copy(run / "log.jsonl", out / "log.jsonl")
EOF
  split -b 15m -d "$OUT/weights.safetensors" "$OUT/weights.safetensors.part-" && rm "$OUT/weights.safetensors"
  ls -l "$OUT"
}

join() {
  local from=${1:?the folder where the files of the device run came back - files_at}
  mkdir -p runs/gpu
  cat "$from"/weights.safetensors.part-* > runs/gpu/model.safetensors
  cp "$from/config.json" "$from/log.jsonl" runs/gpu/
  echo "runs/gpu: gqtok eval runs/gpu --photos ...; gqtok export runs/gpu models/gpu; --init-from runs/gpu"
}

"${1:?prepare, run or join}" "${@:2}"
