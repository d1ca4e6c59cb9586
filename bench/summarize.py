#!/usr/bin/env python3
"""Merges the JSON lines of `imagegen bench` and bench/compare_diffusers.py (one file per
side, one line per invocation), prints a table and the speedup at batch 1.

    python bench/summarize.py IMAGEGEN.jsonl DIFFUSERS.jsonl
"""

import json
import sys


def merge(path):
    """All invocations of one side as one report: batches concatenated, the first ready
    time, the highest peak, the LoRA timing of whichever invocation measured it."""
    with open(path) as f:
        reports = [json.loads(line) for line in f if line.strip()]
    merged = dict(reports[0])
    merged["batches"] = [b for r in reports for b in r["batches"]]
    peaks = [r["peak_rss_mib"] for r in reports if r.get("peak_rss_mib") is not None]
    merged["peak_rss_mib"] = max(peaks) if peaks else None
    merged["lora"] = next((r["lora"] for r in reports if r.get("lora")), None)
    merged["training"] = next((r["training"] for r in reports if r.get("training")), None)
    return merged


def speedup(ours, theirs, batch=1):
    """Ours over theirs, denoising steps per second at `batch`; None without both."""
    rate = lambda r: next((b["steps_per_s"] for b in r["batches"] if b["batch"] == batch), None)  # noqa: E731
    a, b = rate(ours), rate(theirs)
    return a / b if a and b else None


def table(ours, theirs):
    r = ours
    lines = [f"{r['device']} {r['dtype']}, {r['threads']} threads, {r['size']}x{r['size']}, {r['steps']} steps, "
             f"median of {r['runs']} runs",
             f"{'':22}{'imagegen':>12}{'diffusers':>12}"]
    row = lambda name, a, b, fmt: lines.append(  # noqa: E731
        f"{name:22}{'-' if a is None else format(a, fmt):>12}{'-' if b is None else format(b, fmt):>12}")
    row("ready (s)", ours["ready_seconds"], theirs["ready_seconds"], ".2f")
    for batch in sorted({b["batch"] for b in ours["batches"]}):
        get = lambda rep, key: next((b[key] for b in rep["batches"] if b["batch"] == batch), None)  # noqa: E731
        row(f"batch {batch} steps/s", get(ours, "steps_per_s"), get(theirs, "steps_per_s"), ".3f")
        row(f"batch {batch} s/image", get(ours, "seconds_per_image"), get(theirs, "seconds_per_image"), ".2f")
        row(f"batch {batch} images/s", get(ours, "images_per_s"), get(theirs, "images_per_s"), ".3f")
    row("peak RSS (MiB)", ours["peak_rss_mib"], theirs["peak_rss_mib"], ".0f")
    lora = lambda rep, key: rep["lora"][key] if rep.get("lora") else None  # noqa: E731
    row("LoRA load (s)", lora(ours, "load_seconds"), lora(theirs, "load_seconds"), ".3f")
    row("LoRA switch (s)", lora(ours, "switch_seconds"), lora(theirs, "switch_seconds"), ".3f")
    training = ours.get("training")
    if training:
        row("training steps/s", training["steps_per_s"], None, ".3f")
    return "\n".join(lines)


def main():
    ours, theirs = merge(sys.argv[1]), merge(sys.argv[2])
    print(json.dumps({"imagegen": ours, "diffusers": theirs}))
    print(table(ours, theirs))
    ratio = speedup(ours, theirs)
    print(f"speedup vs diffusers: {'n/a' if ratio is None else format(ratio, '.2f')}")


if __name__ == "__main__":
    main()
