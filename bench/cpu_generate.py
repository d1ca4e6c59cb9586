#!/usr/bin/env python3
"""Times `imagegen generate` against diffusers' StableDiffusionPipeline on the same model,
prompt, size, steps and scheduler, on the CPU, and prints medians and their ratio.

Both sides are measured two ways, each run in a fresh process:
  end to end: process start to PNG written (what a user of either CLI waits for);
  generation: the denoising loop + VAE decode alone (model already loaded).

    python bench/cpu_generate.py --imagegen target/release/imagegen --model DIR \
        [--size 256] [--steps 10] [--runs 5] [--scheduler pndm]
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

DIFFUSERS_RUN = r"""
import os, sys, time, json
os.environ["HF_HUB_OFFLINE"] = "1"
t0 = time.perf_counter()
import torch
from diffusers import StableDiffusionPipeline, DDIMScheduler, PNDMScheduler, EulerDiscreteScheduler, \
    EulerAncestralDiscreteScheduler, DPMSolverMultistepScheduler
torch.set_num_threads(int(os.environ.get("THREADS", "0")) or torch.get_num_threads())
model, prompt, size, steps, scheduler, out = sys.argv[1:7]
pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
classes = {"ddim": (DDIMScheduler, {}), "pndm": (PNDMScheduler, {}), "euler": (EulerDiscreteScheduler, {}),
           "euler-a": (EulerAncestralDiscreteScheduler, {}),
           "dpmpp-2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2})}
cls, extra = classes[scheduler]
pipe.scheduler = cls.from_config(pipe.scheduler.config, **extra)
t1 = time.perf_counter()
image = pipe(prompt, height=int(size), width=int(size), num_inference_steps=int(steps), guidance_scale=7.5,
             generator=torch.Generator("cpu").manual_seed(42)).images[0]
t2 = time.perf_counter()
image.save(out)
print(json.dumps({"generate_seconds": t2 - t1}))
"""


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--imagegen", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompt", default="a photo of an astronaut riding a horse")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--scheduler", default="pndm")
    args = ap.parse_args()

    tmp = tempfile.mkdtemp()
    ours_total, ours_gen, ref_total, ref_gen = [], [], [], []
    for run in range(args.runs):
        # Alternate the two sides so that machine noise hits both alike.
        out = os.path.join(tmp, f"ours-{run}.png")
        t0 = time.perf_counter()
        proc = subprocess.run(
            [args.imagegen, "generate", "--model", args.model, "--prompt", args.prompt,
             "--width", str(args.size), "--height", str(args.size), "--steps", str(args.steps),
             "--scheduler", args.scheduler, "--seed", "42", "--device", "cpu", "--out", out],
            capture_output=True, text=True, env={**os.environ, "RUST_LOG": "imagegen=info"}, check=True)
        ours_total.append(time.perf_counter() - t0)
        m = re.search(r"generate_seconds=([0-9.]+)", proc.stderr)
        if m:
            ours_gen.append(float(m.group(1)))

        out = os.path.join(tmp, f"ref-{run}.png")
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-c", DIFFUSERS_RUN, args.model, args.prompt, str(args.size), str(args.steps),
             args.scheduler, out], capture_output=True, text=True, check=True)
        ref_total.append(time.perf_counter() - t0)
        ref_gen.append(json.loads(proc.stdout.strip().splitlines()[-1])["generate_seconds"])
        print(f"run {run}: ours {ours_total[-1]:.2f}s (gen {ours_gen[-1] if ours_gen else float('nan'):.2f}s), "
              f"diffusers {ref_total[-1]:.2f}s (gen {ref_gen[-1]:.2f}s)", flush=True)

    result = {
        "model": args.model, "size": args.size, "steps": args.steps, "scheduler": args.scheduler,
        "runs": args.runs,
        "imagegen_end_to_end_median_s": median(ours_total),
        "diffusers_end_to_end_median_s": median(ref_total),
        "imagegen_generate_median_s": median(ours_gen),
        "diffusers_generate_median_s": median(ref_gen),
    }
    result["speedup_end_to_end"] = result["diffusers_end_to_end_median_s"] / result["imagegen_end_to_end_median_s"]
    result["speedup_generate"] = result["diffusers_generate_median_s"] / result["imagegen_generate_median_s"]
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
