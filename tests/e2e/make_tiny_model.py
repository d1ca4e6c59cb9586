"""Writes what the kind end-to-end test puts into the store: a tiny random-weight SD 1.x model
in diffusers' layout (safetensors; `bench/make_model.py --shape tiny`, the shapes of the
parity fixtures' tiny-sd1, which the runtime is known to load) and a few small photos and an
inpainting mask.

    python tests/e2e/make_tiny_model.py OUT_DIR

OUT_DIR/models/tiny-sd1/              the model (source path /store/models/tiny-sd1)
OUT_DIR/uploads/e2e/01.png, 02.png    64x64 "photos" for the LoRA training
OUT_DIR/uploads/e2e/mask.png          white square = repaint
"""

import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import make_model  # noqa: E402  (the benchmarks' seeded model builder)


def tiny_model(out: Path):
    model_dir = out / "models" / "tiny-sd1"
    make_model.write_model(model_dir, "tiny")
    return model_dir


def photos(out: Path):
    uploads = out / "uploads" / "e2e"
    uploads.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(42)
    for i in (1, 2):
        pixels = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(uploads / f"{i:02d}.png")
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(mask).save(uploads / "mask.png")


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: make_tiny_model.py OUT_DIR")
    out = Path(sys.argv[1]).resolve()
    out.mkdir(parents=True, exist_ok=True)
    print(f"model: {tiny_model(out)}")
    photos(out)
    print(f"photos: {out / 'uploads' / 'e2e'}")


if __name__ == "__main__":
    main()
