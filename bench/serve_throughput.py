#!/usr/bin/env python3
"""Throughput of `imagegen serve` under concurrent clients, with and without batching.

For each --batch-limit and --batch-window-ms given, starts the server on the model; for
each --clients count, sends --requests synchronous text-to-image requests from that many
threads (same size and steps, different seeds, so queued requests can share a UNet batch),
and prints one JSON line: wall time, images/s, latency p50/p99, and how many got 429. Ends
with the ratio of the best batched images/s to unbatched, per client count.

    python bench/serve_throughput.py --imagegen BIN --model DIR [--device cuda] \
        [--size 512] [--steps 25] [--requests 64] [--clients 1,4,16] [--batch-limits 1,8] \
        [--batch-window-ms 0,20]
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


def run(args, batch_limit, window_ms, clients_list):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    store = tempfile.mkdtemp()
    server = subprocess.Popen(
        [args.imagegen, "serve", "--model", args.model, "--device", args.device,
         "--dtype", args.dtype, "--safety", "off", "--listen", f"127.0.0.1:{port}",
         "--store", f"file://{store}", "--queue-size", str(args.requests),
         "--batch-limit", str(batch_limit), "--batch-window-ms", str(window_ms)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(base + "/readyz", timeout=2)
                break
            except Exception:
                if server.poll() is not None:
                    raise SystemExit(f"imagegen serve exited with {server.returncode}")
                time.sleep(0.5)

        def one(seed):
            body = json.dumps({"prompt": "a lighthouse on a cliff at dusk, oil painting",
                               "width": args.size, "height": args.size,
                               "steps": args.steps, "seed": seed}).encode()
            req = urllib.request.Request(base + "/v1/generations", body,
                                         {"Content-Type": "application/json"})
            t0 = time.perf_counter()
            try:
                with urllib.request.urlopen(req, timeout=1800) as r:
                    job = json.load(r)
                ok = job.get("state") == "succeeded"
                return ("ok" if ok else "failed", time.perf_counter() - t0)
            except urllib.error.HTTPError as e:
                return ("429" if e.code == 429 else f"http {e.code}", time.perf_counter() - t0)

        one(0)  # warm-up: kernels chosen, allocator primed
        return [measure(args, one, batch_limit, window_ms, clients) for clients in clients_list]
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()


def measure(args, one, batch_limit, window_ms, clients):
    results, lock, next_seed = [], threading.Lock(), iter(range(1, args.requests + 1))

    def client():
        while True:
            with lock:
                seed = next(next_seed, None)
            if seed is None:
                return
            outcome = one(seed)
            with lock:
                results.append(outcome)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = [s for status, s in results if status == "ok"]
    line = {
        "batch_limit": batch_limit, "device": args.device, "dtype": args.dtype,
        "size": args.size, "steps": args.steps, "requests": args.requests,
        "clients": clients, "batch_window_ms": window_ms, "succeeded": len(ok),
        "rejected_429": sum(1 for status, _ in results if status == "429"),
        "other": sorted({status for status, _ in results} - {"ok", "429"}),
        "wall_s": round(wall, 3), "images_per_s": round(len(ok) / wall, 3),
        "p50_s": round(statistics.median(ok), 3) if ok else None,
        "p99_s": round(percentile(ok, 0.99), 3) if ok else None,
    }
    print(json.dumps(line), flush=True)
    return line


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--imagegen", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="f16")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--clients", default="16")
    ap.add_argument("--batch-limits", default="1,8")
    ap.add_argument("--batch-window-ms", default="0")
    args = ap.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    lines = []
    for b in args.batch_limits.split(","):
        # A window only matters where there is batching.
        windows = args.batch_window_ms.split(",") if int(b) > 1 else ["0"]
        for w in windows:
            lines += run(args, int(b), int(w), clients)
    for c in clients:
        at = [l for l in lines if l["clients"] == c]
        base = next((l for l in at if l["batch_limit"] == 1), None)
        if base and base["images_per_s"]:
            best = max(at, key=lambda l: l["images_per_s"])
            print(f"{c} clients: batching speedup {best['images_per_s'] / base['images_per_s']:.2f} "
                  f"(batch limit {best['batch_limit']}, window {best['batch_window_ms']} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
