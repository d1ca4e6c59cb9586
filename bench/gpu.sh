#!/usr/bin/env bash
# bench/run.sh gpu on the GPU machine, which has PyTorch (and diffusers) in /opt/torch/.venv
# but no Rust toolchain: the release binary is built elsewhere, against the same libtorch
# version, and carried here (IMAGEGEN_BIN, default bench/bin/imagegen); run.sh points
# LD_LIBRARY_PATH at that Python's torch/lib so the binary finds libtorch.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHON="${PYTHON:-/opt/torch/.venv/bin/python}"
export IMAGEGEN_BIN="${IMAGEGEN_BIN:-$root/bench/bin/imagegen}"
exec "$root/bench/run.sh" gpu
