"""What the serving-at-scale step of tests/e2e/local.sh measured, from the ImageGenerations
as the API server has them (`kubectl get imagegenerations -o json`, one file per namespace).

    scale_report.py GENERATIONS_JSON...

Prints one line per namespace and one for all: generations, images, the pods they ran on
(count per pod), the share of LoRA generations sent to a pod with the LoRA warm, and the
completion time from creation to the image (p50, p99, max). The last line is JSON, for the
checks that follow.
"""

import json
import statistics
import sys
from datetime import datetime


def seconds(start, end):
    parse = lambda t: datetime.fromisoformat(t.replace("Z", "+00:00"))
    return (parse(end) - parse(start)).total_seconds()


def percentile(values, q):
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def submitted_message(item):
    for condition in item.get("status", {}).get("conditions", []):
        if condition["type"] == "Submitted":
            return condition.get("message", "")
    return ""


def summarize(items):
    times, pods, images = [], {}, 0
    lora_total = lora_warm = 0
    reasons = {}
    for item in items:
        status = item.get("status", {})
        completed = (status.get("timings") or {}).get("completionTime")
        if completed:
            times.append(seconds(item["metadata"]["creationTimestamp"], completed))
        pod = (status.get("runtimePod") or {}).get("name", "?")
        pods[pod] = pods.get(pod, 0) + 1
        images += len(status.get("images", []))
        message = submitted_message(item)
        reason = message.split("(", 1)[-1].split(":", 1)[0] if "(" in message else "?"
        reasons[reason] = reasons.get(reason, 0) + 1
        if item["spec"].get("loras"):
            lora_total += 1
            lora_warm += reason == "lora_warm"
    return {
        "generations": len(items),
        "images": images,
        "pods": dict(sorted(pods.items())),
        "reasons": dict(sorted(reasons.items())),
        "lora_generations": lora_total,
        "lora_warm": lora_warm,
        "p50": percentile(times, 0.5),
        "p99": percentile(times, 0.99),
        "max": max(times) if times else None,
        "mean": statistics.fmean(times) if times else None,
    }


def line(name, s):
    fmt = lambda v: "-" if v is None else f"{v:.1f}s"
    warm = (
        f"{s['lora_warm']}/{s['lora_generations']} LoRA generations to a warm pod"
        if s["lora_generations"]
        else "no LoRA generations"
    )
    spread = ", ".join(f"{pod.rsplit('-', 1)[-1]}:{n}" for pod, n in s["pods"].items())
    return (
        f"{name}: {s['generations']} generations, {s['images']} images, pods {{{spread}}}, "
        f"{warm}, completion p50 {fmt(s['p50'])} p99 {fmt(s['p99'])} max {fmt(s['max'])}; "
        f"chosen as {s['reasons']}"
    )


def main(paths):
    everything, report = [], {}
    for path in paths:
        with open(path) as f:
            items = json.load(f)["items"]
        namespace = items[0]["metadata"]["namespace"] if items else path
        report[namespace] = summarize(items)
        everything += items
        print(line(namespace, report[namespace]))
    report["all"] = summarize(everything)
    print(line("all", report["all"]))
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1:])
