#!/usr/bin/env bash
# Times `imagegen bench` against diffusers (bench/compare_diffusers.py) on the same
# random-weight model with SD 1.5's shapes, alternating the two sides batch size by batch
# size, and ends with `speedup vs diffusers: X.XX` (denoising steps/s at batch 1, ours over
# diffusers').
#
#   bench/run.sh cpu   # f32, 256x256, 10 steps, batches 1 and 4
#   bench/run.sh gpu   # cuda f16, 512x512, 25 steps, batches 1 and 8, 20 training steps
#
# Environment: PYTHON (default: the project's venv), IMAGEGEN_BIN (an already built binary:
# no cargo build then), RUNS (timed runs per batch size), SIZE, STEPS, BATCHES, TRAIN_STEPS
# (DreamBooth-LoRA training steps timed on our side at SIZE; 0 = none), SHAPE
# (sd15 or tiny), IMAGEGEN_CACHE (the model goes to $IMAGEGEN_CACHE/bench/<shape>), MODEL
# (an existing diffusers folder to time instead, e.g. the test fixtures' sdxl-shapes: SDXL's
# real shapes; the LoRA switch is timed when it has lora/pytorch_lora_weights.safetensors).
set -euo pipefail
mode="${1:-cpu}"
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
. scripts/env.sh
PYTHON="${PYTHON:-$IMAGEGEN_VENV/bin/python}"

case "$mode" in
cpu) device=cpu dtype=f32 size=256 steps=10 batches=1,4 runs=2 train_steps=0 ;;
gpu) device=cuda dtype=f16 size=512 steps=25 batches=1,8 runs=3 train_steps=20 ;;
*) echo "usage: $0 cpu|gpu" >&2; exit 2 ;;
esac
shape="${SHAPE:-sd15}"
size="${SIZE:-$size}" steps="${STEPS:-$steps}" batches="${BATCHES:-$batches}" runs="${RUNS:-$runs}"
train_steps="${TRAIN_STEPS:-$train_steps}"

if [ -z "${IMAGEGEN_BIN:-}" ]; then
  cargo build --release -p imagegen-runtime >&2
  IMAGEGEN_BIN="$CARGO_TARGET_DIR/release/imagegen"
fi
# The binary links the libtorch of the Python torch it was built against.
torch_lib="$("$PYTHON" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

if [ -n "${MODEL:-}" ]; then
  model="$MODEL"
else
  model="$IMAGEGEN_CACHE/bench/$shape"
  "$PYTHON" bench/make_model.py --out "$model" --shape "$shape" >&2
fi
lora="$model/lora/pytorch_lora_weights.safetensors"

results="$(mktemp -d)"
common=(--model "$model" --device "$device" --dtype "$dtype" --size "$size" --steps "$steps" --runs "$runs")
first=1
for batch in ${batches//,/ }; do
  # The LoRA switch is timed once per side, with the first batch size.
  extra=() train=()
  [ "$first" = 1 ] && [ -f "$lora" ] && extra=(--lora "$lora")
  [ "$first" = 1 ] && train=(--train-steps "$train_steps")
  echo "== imagegen, batch $batch" >&2
  "$IMAGEGEN_BIN" bench "${common[@]}" --batches "$batch" "${extra[@]}" "${train[@]}" >>"$results/imagegen.jsonl"
  echo "== diffusers, batch $batch" >&2
  "$PYTHON" bench/compare_diffusers.py "${common[@]}" --batches "$batch" "${extra[@]}" >>"$results/diffusers.jsonl"
  first=0
done

"$PYTHON" bench/summarize.py "$results/imagegen.jsonl" "$results/diffusers.jsonl"
