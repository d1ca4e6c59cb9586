"""Writes what the kind end-to-end test puts into the store: a tiny random-weight SD 1.x model
in diffusers' layout (safetensors, built exactly as the parity fixtures' tiny-sd1, so the
runtime is known to load it) and a few small photos and an inpainting mask.

    python tests/e2e/make_tiny_model.py OUT_DIR

OUT_DIR/models/tiny-sd1/              the model (source path /store/models/tiny-sd1)
OUT_DIR/uploads/e2e/01.png, 02.png    64x64 "photos" for the LoRA training
OUT_DIR/uploads/e2e/mask.png          white square = repaint
"""

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))
import make_fixtures as fx  # noqa: E402  (the fixture generator's model builders)


def tiny_model(out: Path):
    tok_src = out / "tokenizer-src"
    fx.fresh_dir(tok_src)
    fx.write_tokenizer_files(tok_src)
    tok = fx.load_tokenizer(tok_src)
    text_encoder = fx.make_text_encoder(tok, 100, 32, 37, 3, 4, "quick_gelu")
    torch.manual_seed(101)
    unet = fx.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    ).eval()
    vae = fx.make_vae(102, (16, 16, 32, 32), 1, 8, 64)
    pipe = fx.build_pipeline(tok, text_encoder, unet, vae, fx.sd15_pndm())
    model_dir = out / "models" / "tiny-sd1"
    fx.fresh_dir(model_dir)
    pipe.save_pretrained(str(model_dir), safe_serialization=True)
    fx.overwrite_sd15_scheduler_config(model_dir)
    fx.copy_tokenizer_sources(tok_src, model_dir / "tokenizer")
    fx.rewrite_text_encoder_hub_layout(model_dir / "text_encoder")
    fx.shutil.rmtree(tok_src)
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
