"""Summarise a torch.profiler Chrome trace of a few train steps: how busy the GPU was and with what.

    python benchmarks/trace_summary.py TRACE.json [--steps 3] [--top 25]

Prints one JSON line: the span from the first to the last GPU activity, the time the GPU was busy
(union of kernel, memcpy and memset intervals), the idle gaps, the number of kernels, and time per
kernel category (GEMM, attention, NCCL, Triton/Inductor, optimizer, other); then the top kernels by
total time. Per-step figures divide by `--steps` (the number of steps the trace covers).
"""

import argparse
import json
import sys
from collections import defaultdict
from typing import NoReturn

GPU_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}


def category(name: str) -> str:
    low = name.lower()
    if "nccl" in low:
        return "nccl"
    if "gemm" in low or "cutlass" in low or "sm90_xmma" in low or "nvjet" in low or "cublas" in low:
        return "gemm"
    if "flash" in low or "fmha" in low or "attention" in low or "cudnn" in low:
        return "attention"
    if "adam_atan2" in low or "foreach" in low:
        return "optimizer"
    if low.startswith("triton_") or "triton" in low:
        return "inductor_triton"
    return "other"


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trace")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    try:
        with open(args.trace) as f:
            events = json.load(f)["traceEvents"]
    except FileNotFoundError:
        fail(f"{args.trace}: no such file")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        fail(f"{args.trace}: not JSON ({e})")
    except (KeyError, TypeError):
        fail(f"{args.trace}: no 'traceEvents' list (not a torch.profiler Chrome trace)")
    gpu = sorted((e for e in events if e.get("cat") in GPU_CATEGORIES and "dur" in e), key=lambda e: float(e["ts"]))
    if not gpu:
        fail(f"{args.trace}: no GPU events")
    start = float(gpu[0]["ts"])
    end = max(float(e["ts"]) + float(e["dur"]) for e in gpu)
    busy, cur_start, cur_end = 0.0, None, None
    for e in gpu:
        s, d = float(e["ts"]), float(e["dur"])
        if cur_end is None or s > cur_end:
            if cur_end is not None:
                busy += cur_end - cur_start
            cur_start, cur_end = s, s + d
        else:
            cur_end = max(cur_end, s + d)
    busy += cur_end - cur_start
    per_cat, per_name, counts = defaultdict(float), defaultdict(float), defaultdict(int)
    for e in gpu:
        per_cat[category(e["name"])] += float(e["dur"])
        per_name[e["name"][:100]] += float(e["dur"])
        counts[e["name"][:100]] += 1
    n = args.steps
    summary = {
        "trace": args.trace,
        "span_ms_per_step": round((end - start) / 1000 / n, 3),
        "busy_ms_per_step": round(busy / 1000 / n, 3),
        "idle_ms_per_step": round((end - start - busy) / 1000 / n, 3),
        "gpu_ops_per_step": round(len(gpu) / n, 1),
        "ms_per_step_by_category": {k: round(v / 1000 / n, 3) for k, v in sorted(per_cat.items())},
    }
    print(json.dumps(summary))
    for name, total in sorted(per_name.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"{total / 1000 / n:8.3f} ms/step  {counts[name] / n:6.1f}x  {name}")


if __name__ == "__main__":
    main()
