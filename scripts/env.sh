# Sourced by the other scripts: where the Python venv and the cargo target dir live.
# Both sit outside the clone so that repeated runs (and CI on the same machine) reuse them.
IMAGEGEN_CACHE="${IMAGEGEN_CACHE:-$HOME/.cache/imagegen}"
IMAGEGEN_VENV="${IMAGEGEN_VENV:-$IMAGEGEN_CACHE/venv}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$IMAGEGEN_CACHE/target}"
export LIBTORCH_USE_PYTORCH=1
export PATH="$IMAGEGEN_VENV/bin:$PATH"
export HF_HUB_OFFLINE=1
