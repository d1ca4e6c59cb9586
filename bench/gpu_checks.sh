#!/usr/bin/env bash
# Everything that needs a CUDA device, in one run, for a GPU machine that has PyTorch and the
# Python reference libraries but no Rust toolchain (the release binary is built elsewhere against
# the same libtorch and carried: IMAGEGEN_BIN). Each part logs to $LOG_DIR and a failing part
# does not stop the others; the exit status says whether any failed.
#
#   IMAGEGEN_BIN=... TINY_MODEL=<tiny-sd1 folder> LOG_DIR=... bench/gpu_checks.sh
#
# Where the machine has torch but no diffusers and no network, carry the pinned wheels and
# install them beside torch, not over it:
#   python3 -m pip install --no-deps --no-index --target /tmp/pylib wheels/*.whl
#   PYTHONPATH=/tmp/pylib IMAGEGEN_BIN=... bench/gpu_checks.sh
#
# 1. bench/gpu.sh: throughput against diffusers (f16, 512², 25 steps, batches 1 and 8), the
#    LoRA switch and 20 DreamBooth-LoRA training steps, on SD 1.5 shapes.
# 2. bench/gpu_parity.py: our images against diffusers' on the GPU, f32 and f16, on the tiny
#    model and on SD 1.5 shapes.
# 3. `imagegen train` with --mixed-precision fp16 and bf16 on cuda.
# 4. `imagegen serve` on cuda: one generation (C2PA-signed where openssl can make a test
#    certificate) and the gpu_memory_used_bytes metric.
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
export PYTHON="${PYTHON:-python3}"
export IMAGEGEN_BIN="${IMAGEGEN_BIN:?the release binary}"
export IMAGEGEN_CACHE="${IMAGEGEN_CACHE:-/tmp/imagegen-cache}"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
tiny="${TINY_MODEL:?a tiny-sd1 fixture folder}"
# DEVICE=cpu PARTS="parity-tiny train-bf16 serve" tries the script itself on a machine without a GPU.
device="${DEVICE:-cuda}"
parts="${PARTS:-bench parity-tiny parity-sd15 train-fp16 train-bf16 serve}"
logs="${LOG_DIR:-/tmp/imagegen-gpu-logs}"
mkdir -p "$logs" "$IMAGEGEN_CACHE"
torch_lib="$("$PYTHON" -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
failed=()
part() { # name, command...
  local name="$1"; shift
  case " $parts " in *" $name "*) ;; *) return 0 ;; esac
  echo "=== $name" >&2
  local t0=$SECONDS
  if "$@" >"$logs/$name.log" 2>&1; then echo "=== $name: ok ($((SECONDS - t0)) s)" >&2
  else echo "=== $name: FAILED ($((SECONDS - t0)) s)" >&2; failed+=("$name"); fi
  tail -n 25 "$logs/$name.log" >&2
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >&2 || true

part bench bench/gpu.sh
part parity-tiny "$PYTHON" bench/gpu_parity.py --imagegen "$IMAGEGEN_BIN" --model "$tiny" --size 64 --steps 10 --device "$device"
sd15_parity() { # the bench part makes the SD 1.5-shaped model; make it here when that part is skipped
  "$PYTHON" bench/make_model.py --out "$IMAGEGEN_CACHE/bench/sd15" --shape sd15 &&
    "$PYTHON" bench/gpu_parity.py "$@"
}
part parity-sd15 sd15_parity --imagegen "$IMAGEGEN_BIN" \
  --model "$IMAGEGEN_CACHE/bench/sd15" --size 512 --steps 10 --device "$device"

train() { # precision
  local dir; dir="$(mktemp -d)"
  "$PYTHON" - "$dir/images" <<'EOF'
import os, sys
import numpy as np
from PIL import Image
os.makedirs(sys.argv[1], exist_ok=True)
rng = np.random.default_rng(0)
for i in range(4):
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(f"{sys.argv[1]}/{i}.png")
EOF
  "$IMAGEGEN_BIN" train --model "$tiny" --images "$dir/images" --instance-prompt "a photo of sks dog" \
    --steps 40 --resolution 64 --mixed-precision "$1" --device "$device" --train-text-encoder \
    --out "$dir/out" | tee "$dir/events.jsonl"
  # Finite losses all the way and the LoRA written.
  "$PYTHON" - "$dir" <<'EOF'
import json, math, os, sys
d = sys.argv[1]
events = [json.loads(l) for l in open(f"{d}/events.jsonl") if l.strip()]
losses = [e["loss"] for e in events if e.get("loss") is not None]
assert losses and all(math.isfinite(x) for x in losses), losses
assert os.path.getsize(f"{d}/out/pytorch_lora_weights.safetensors") > 0
print(f"{len(losses)} losses, first {losses[0]:.4f}, last {losses[-1]:.4f}")
EOF
}
part train-fp16 train fp16
part train-bf16 train bf16

serve() {
  local port=18471 log c2pa sign=() signed=0; log="$(mktemp)"; c2pa="$(mktemp -d)"
  # Sign with a throwaway certificate where openssl is at hand, so the whole service runs.
  if bash scripts/c2pa-test-cert.sh "$c2pa" >/dev/null 2>&1; then
    sign=(--c2pa-cert "$c2pa/chain.pem" --c2pa-key "$c2pa/key.pem"); signed=1
  fi
  "$IMAGEGEN_BIN" serve --model "$tiny" --device "$device" --safety off --listen "127.0.0.1:$port" \
    --store "file://$(mktemp -d)" "${sign[@]}" >"$log" 2>&1 &
  local pid=$!
  "$PYTHON" - "$port" "$device" "$signed" <<'EOF'
import json, sys, time, urllib.request
base = f"http://127.0.0.1:{sys.argv[1]}"
for _ in range(300):
    try:
        urllib.request.urlopen(base + "/readyz", timeout=2)
        break
    except Exception:
        time.sleep(0.5)
body = json.dumps({"prompt": "a red fox", "width": 64, "height": 64, "steps": 4, "seed": 1}).encode()
req = urllib.request.Request(base + "/v1/generations", body, {"Content-Type": "application/json"})
t0 = time.perf_counter()
job = json.load(urllib.request.urlopen(req, timeout=300))
print("state", job["state"], "in", round(time.perf_counter() - t0, 3), "s")
assert job["state"] == "succeeded", job
if sys.argv[3] == "1":
    url = job["result"]["images"][0]["url"]
    png = urllib.request.urlopen(url if url.startswith("http") else base + url, timeout=60).read()
    assert b"caBX" in png, "no C2PA manifest in the PNG"
    print("C2PA manifest present,", len(png), "bytes")
metrics = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
lines = [l for l in metrics.splitlines() if l.startswith("imagegen_gpu_memory") or "gpu_memory" in l]
print("\n".join(lines))
if sys.argv[2] != "cpu":
    assert any(not l.startswith("#") and float(l.split()[-1]) > 0 for l in lines), "no GPU memory reading"
EOF
  local rc=$?
  kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
  tail -n 5 "$log"
  return $rc
}
part serve serve

if [ "${#failed[@]}" -gt 0 ]; then echo "failed: ${failed[*]}" >&2; exit 1; fi
echo "all GPU checks passed" >&2
