"""Writes what the kind end-to-end test puts into the store: a tiny random-weight SD 1.x model
in diffusers' layout (safetensors; `bench/make_model.py --shape tiny`, the shapes of the
parity fixtures' tiny-sd1, which the runtime is known to load) and a few small photos and an
inpainting mask.

    python tests/e2e/make_tiny_model.py OUT_DIR

OUT_DIR/models/tiny-sd1/              the model (source path /store/models/tiny-sd1)
OUT_DIR/uploads/e2e/01.png, 02.png    64x64 "photos" for the LoRA training
OUT_DIR/uploads/e2e/mask.png          white square = repaint
OUT_DIR/models/tiny-clipseg/          a tiny random CLIPSeg, saved with its processor, for
                                      inpainting with a mask prompt
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


def tiny_clipseg(out: Path):
    """A CLIPSeg of the parity fixtures' tiny shape, with the fixture tokenizer, saved as
    transformers saves a model and its CLIPSegProcessor."""
    import tempfile

    import make_fixtures as mf  # beside make_model, on the same path
    import torch
    from transformers import (
        CLIPSegConfig,
        CLIPSegForImageSegmentation,
        CLIPSegProcessor,
        CLIPTokenizer,
        ViTImageProcessor,
    )

    with tempfile.TemporaryDirectory() as tok_dir:
        mf.write_tokenizer_files(Path(tok_dir))
        tok = CLIPTokenizer.from_pretrained(tok_dir, model_max_length=77)
    torch.manual_seed(1234)
    config = CLIPSegConfig(
        text_config={"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 48,
                     "num_hidden_layers": 2, "num_attention_heads": 2,
                     "max_position_embeddings": 77, "eos_token_id": tok.eos_token_id,
                     "bos_token_id": tok.bos_token_id, "pad_token_id": tok.pad_token_id},
        vision_config={"hidden_size": 40, "intermediate_size": 56, "num_hidden_layers": 4,
                       "num_attention_heads": 4, "image_size": 64, "patch_size": 16},
        projection_dim=24, extract_layers=[0, 2], reduce_dim=16,
        decoder_num_attention_heads=2, decoder_intermediate_size=24, conditional_layer=0,
        use_complex_transposed_convolution=True,
    )
    model = CLIPSegForImageSegmentation(config).eval()
    model_dir = out / "models" / "tiny-clipseg"
    model.save_pretrained(str(model_dir), safe_serialization=True)
    processor = ViTImageProcessor(size={"height": 64, "width": 64},
                                  image_mean=[0.48145466, 0.4578275, 0.40821073],
                                  image_std=[0.26862954, 0.26130258, 0.27577711])
    CLIPSegProcessor(image_processor=processor, tokenizer=tok).save_pretrained(str(model_dir))
    return model_dir


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: make_tiny_model.py OUT_DIR")
    out = Path(sys.argv[1]).resolve()
    out.mkdir(parents=True, exist_ok=True)
    print(f"model: {tiny_model(out)}")
    photos(out)
    print(f"photos: {out / 'uploads' / 'e2e'}")
    print(f"mask model: {tiny_clipseg(out)}")


if __name__ == "__main__":
    main()
