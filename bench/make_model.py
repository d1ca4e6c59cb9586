#!/usr/bin/env python3
"""Builds a Stable Diffusion pipeline folder with random (seeded) weights for benchmarks.

    python bench/make_model.py --out DIR [--shape sd15|tiny]

`sd15` has SD 1.5's real shapes (860M-parameter UNet, 123M text encoder, 84M VAE), so
timings match the real model's; `tiny` is the small test pipeline, for a quick check.
The tokenizer is the small BPE of the test fixtures (its vocabulary is padded to CLIP's
49408 entries for `sd15`). Also writes `DIR/lora/pytorch_lora_weights.safetensors`, a
rank-8 LoRA on the UNet's attention projections (diffusers' names), for the LoRA switch
timing. Nothing is downloaded; the same seed gives the same files. Does nothing when
`DIR/model_index.json` already exists (the folder is built aside and renamed into place).
"""

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "fixtures"))

import make_fixtures as mf  # noqa: E402  (sets the offline variables before torch loads)
import torch  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

LORA_RANK = 8
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def build(shape: str, tok):
    if shape == "sd15":
        te = mf.make_text_encoder(tok, 500, 768, 3072, 12, 12, "quick_gelu", vocab_size=49408, projection_dim=768)
        torch.manual_seed(501)
        unet = UNet2DConditionModel(
            sample_size=64,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768,
            attention_head_dim=8,
            norm_num_groups=32,
        ).eval()
        vae = mf.make_vae(502, (128, 256, 512, 512), 2, 32, 512)
    else:
        te = mf.make_text_encoder(tok, 100, 32, 37, 3, 4, "quick_gelu")
        torch.manual_seed(101)
        unet = UNet2DConditionModel(
            sample_size=8,
            block_out_channels=(32, 64),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=32,
        ).eval()
        vae = mf.make_vae(102, (16, 16, 32, 32), 1, 8, 64)
    return te, unet, vae


@torch.no_grad()
def write_lora(unet, path: Path, seed: int = 900):
    """Rank-8 A/B pairs for every attention projection, small enough to keep outputs sane."""
    gen = torch.Generator("cpu").manual_seed(seed)
    state = {}
    for name, module in sorted(unet.named_modules()):
        if isinstance(module, torch.nn.Linear) and name.endswith(LORA_TARGETS):
            out_f, in_f = module.weight.shape
            state[f"unet.{name}.lora_A.weight"] = torch.randn(LORA_RANK, in_f, generator=gen) / in_f**0.5
            state[f"unet.{name}.lora_B.weight"] = torch.randn(out_f, LORA_RANK, generator=gen) * 0.01
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return len(state) // 2


def write_model(out: Path, shape: str):
    """Builds the model and its LoRA aside, then renames the folder into place at `out`.
    Returns the number of LoRA modules, or None when `out` already holds a model."""
    if (out / "model_index.json").is_file():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        tok_src = Path(tmp) / "tokenizer"
        mf.write_tokenizer_files(tok_src)
        tok = mf.load_tokenizer(tok_src)
        te, unet, vae = build(shape, tok)
        pipe = mf.build_pipeline(tok, te, unet, vae, mf.sd15_pndm())
        if out.exists():
            shutil.rmtree(out)
        partial = out.with_name(out.name + ".partial")
        if partial.exists():
            shutil.rmtree(partial)
        pipe.save_pretrained(str(partial), safe_serialization=True)
        mf.overwrite_sd15_scheduler_config(partial)
        # Both tokenizer layouts, so that the model also loads in tools that read only one.
        mf.set_tokenizer_layout(tok_src, partial / "tokenizer", mf.LAYOUT_BOTH)
        mf.rewrite_text_encoder_hub_layout(partial / "text_encoder")
        modules = write_lora(unet, partial / "lora" / "pytorch_lora_weights.safetensors")
        partial.rename(out)
    return modules


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--shape", choices=("sd15", "tiny"), default="sd15")
    args = ap.parse_args()
    out: Path = args.out.resolve()
    t0 = time.time()
    modules = write_model(out, args.shape)
    if modules is None:
        print(f"{out} already exists", flush=True)
        return
    print(f"{args.shape} model in {out} ({modules} LoRA modules), {time.time() - t0:.1f}s", flush=True)


if __name__ == "__main__":
    main()
