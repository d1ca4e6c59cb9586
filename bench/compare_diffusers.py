#!/usr/bin/env python3
"""The `imagegen bench` measurements, taken on diffusers' pipeline for the folder
(StableDiffusionPipeline or StableDiffusionXLPipeline, from its model_index.json; eager,
the same dtype, PyTorch's default attention, SDPA), printed as the same JSON object.

    python bench/compare_diffusers.py --model DIR [--device cpu|cuda] [--dtype f32|f16|bf16]
        [--size 256] [--steps 10] [--batches 1,4] [--runs 3] [--lora FILE|DIR]
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import diffusers  # noqa: E402
from diffusers import DiffusionPipeline  # noqa: E402

diffusers.utils.logging.set_verbosity_error()
diffusers.utils.logging.disable_progress_bar()

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_rss_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return None


def timed_call(pipe, args, batch, steps):
    step_ends = []
    sync(args.device)
    start = time.perf_counter()

    def on_step_end(_pipe, _step, _t, kwargs):
        sync(args.device)
        step_ends.append(time.perf_counter() - start)
        return kwargs

    images = pipe(
        args.prompt, height=args.size, width=args.size, num_inference_steps=steps,
        guidance_scale=args.guidance, num_images_per_prompt=batch,
        generator=[torch.Generator("cpu").manual_seed(42 + i) for i in range(batch)],
        callback_on_step_end=on_step_end,
    ).images
    sync(args.device)
    seconds = time.perf_counter() - start
    assert len(images) == batch
    rate = (len(step_ends) - 1) / (step_ends[-1] - step_ends[0])
    return seconds, rate


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=DTYPES, default=None)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--lora", default=None)
    ap.add_argument("--prompt", default="a photo of an astronaut riding a horse on mars")
    ap.add_argument("--guidance", type=float, default=7.5)
    args = ap.parse_args()
    dtype_name = args.dtype or ("f16" if args.device.startswith("cuda") else "f32")
    batches = [int(b) for b in args.batches.split(",")]

    sync(args.device)
    start = time.perf_counter()
    with open(os.path.join(args.model, "model_index.json")) as f:
        sdxl = "XL" in json.load(f)["_class_name"]
    # Safety checker off on both sides; SDXL: no invisible watermark (imagegen adds none).
    extra = {"add_watermarker": False} if sdxl else {"safety_checker": None, "requires_safety_checker": False}
    pipe = DiffusionPipeline.from_pretrained(args.model, torch_dtype=DTYPES[dtype_name], **extra).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    sync(args.device)
    ready_seconds = time.perf_counter() - start
    print(f"ready in {ready_seconds:.2f}s", file=sys.stderr, flush=True)

    results = []
    for batch in batches:
        timed_call(pipe, args, batch, 2)  # warm-up
        calls, rates = [], []
        for run in range(args.runs):
            seconds, rate = timed_call(pipe, args, batch, args.steps)
            print(f"batch {batch} run {run}: {seconds:.2f}s, {rate:.3f} steps/s", file=sys.stderr, flush=True)
            calls.append(seconds)
            rates.append(rate)
        call = statistics.median(calls)
        results.append({"batch": batch, "steps_per_s": statistics.median(rates), "seconds_per_image": call / batch,
                        "images_per_s": batch / call, "call_seconds": call})

    lora = None
    if args.lora:
        path = args.lora
        kwargs = {}
        if os.path.isfile(path):
            path, kwargs["weight_name"] = os.path.dirname(path) or ".", os.path.basename(path)
        start = time.perf_counter()
        pipe.load_lora_weights(path, adapter_name="bench", **kwargs)
        sync(args.device)
        load_seconds = time.perf_counter() - start
        times = []
        for _ in range(args.runs + 1):
            sync(args.device)
            start = time.perf_counter()
            pipe.fuse_lora(lora_scale=1.0, adapter_names=["bench"])
            pipe.unfuse_lora()
            sync(args.device)
            times.append(time.perf_counter() - start)
        lora = {"load_seconds": load_seconds, "switch_seconds": statistics.median(times[1:])}

    report = {
        "implementation": "diffusers", "model": args.model, "device": args.device, "dtype": dtype_name,
        "threads": torch.get_num_threads(), "size": args.size, "steps": args.steps, "runs": args.runs,
        "ready_seconds": ready_seconds, "batches": results, "peak_rss_mib": peak_rss_mib(), "lora": lora,
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
