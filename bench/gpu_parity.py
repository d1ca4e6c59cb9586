#!/usr/bin/env python3
"""Our `imagegen generate` against diffusers' StableDiffusionPipeline on a CUDA device: same
model, prompt, seed (initial noise from the CPU generator on both sides), size, steps and dtype.
Prints one JSON line per case: the share of 8-bit values within 1/255 and within 8/255, and the
mean and largest absolute difference. f32 should agree almost exactly; f16 drifts further because
the kernels accumulate in a different order.

    python bench/gpu_parity.py --imagegen BIN --model DIR [--size 512] [--steps 10] \
        [--dtypes f32,f16] [--device cuda]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import StableDiffusionPipeline  # noqa: E402
from PIL import Image  # noqa: E402

PROMPT = "a photo of an astronaut riding a horse on the moon"


def diffusers_image(model, dtype, device, size, steps, seed):
    torch_dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[dtype]
    pipe = StableDiffusionPipeline.from_pretrained(
        model, torch_dtype=torch_dtype, safety_checker=None, requires_safety_checker=False
    ).to(device)
    image = pipe(
        PROMPT,
        height=size,
        width=size,
        num_inference_steps=steps,
        guidance_scale=7.5,
        generator=torch.Generator("cpu").manual_seed(seed),
    ).images[0]
    del pipe
    torch.cuda.empty_cache()
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def our_image(binary, model, dtype, device, size, steps, seed, out_dir):
    out = os.path.join(out_dir, f"ours-{dtype}.png")
    cmd = [
        binary, "generate", "--model", model, "--prompt", PROMPT, "--width", str(size),
        "--height", str(size), "--steps", str(steps), "--guidance", "7.5", "--seed", str(seed),
        "--device", device, "--dtype", dtype, "--safety", "off", "--out", out,
    ]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    path = out if os.path.isfile(out) else os.path.join(out, sorted(os.listdir(out))[0])
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--imagegen", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--dtypes", default="f32,f16")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in args.dtypes.split(","):
            ours = our_image(args.imagegen, args.model, dtype, args.device, args.size, args.steps,
                             args.seed, tmp)
            theirs = diffusers_image(args.model, dtype, args.device, args.size, args.steps, args.seed)
            diff = np.abs(ours - theirs)
            print(json.dumps({
                "model": os.path.basename(os.path.normpath(args.model)),
                "device": args.device,
                "dtype": dtype,
                "size": args.size,
                "steps": args.steps,
                "within_1": float((diff <= 1).mean()),
                "within_8": float((diff <= 8).mean()),
                "mean_abs": float(diff.mean()),
                "max_abs": int(diff.max()),
            }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
