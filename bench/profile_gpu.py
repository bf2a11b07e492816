"""Where does a compressed token's time go? Plain `model.generate` (no Lightning), interleaved timing of a dense
model and compressed variants, then one torch.profiler pass each: host (CPU) time by op, GPU kernel time and
how busy the GPU is per token.

    python bench/profile_gpu.py --shape llama_1b --tokens 16 --out $OUT
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from harness.codecs import make_codec  # noqa: E402
from harness.generation import greedy_generate  # noqa: E402
from harness.models import load_model  # noqa: E402
from harness.runtime import compress_model  # noqa: E402

ARMS = {
    # name: (codec, policy, options, placement, no-op decode)
    "block": ("nvcomp_ans_batched", "block", {}, "gpu", False),
    "block ahead=1": ("nvcomp_ans_batched", "block", {"ahead": 1}, "gpu", False),
    "block ahead=1, decode skipped": ("nvcomp_ans_batched", "block", {"ahead": 1}, "gpu", True),
    "python-API block": ("nvcomp_ans", "block", {}, "gpu", False),
}


def build(shape):
    return load_model({"kind": "synthetic", "name": shape, "shape": shape, "seed": 0, "dtype": "bfloat16"}, "cuda")


def busy_fraction(trace_path: str) -> tuple[float, float]:
    """GPU kernel time (sum) and the union of kernel intervals over the traced span, from a Chrome trace."""
    with open(trace_path) as f:
        events = json.load(f)["traceEvents"]
    kernels = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e)
    if not kernels:
        return 0.0, 0.0
    total = sum(b - a for a, b in kernels)
    union, cur_a, cur_b = 0.0, *kernels[0]
    for a, b in kernels[1:]:
        if a > cur_b:
            union += cur_b - cur_a
            cur_a, cur_b = a, b
        else:
            cur_b = max(cur_b, b)
    union += cur_b - cur_a
    return total, union


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama_1b")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--arms", nargs="*", default=list(ARMS))
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    models = {"baseline": build(args.shape)}
    runtimes = {}
    for arm in args.arms:
        codec, policy, opts, placement, skip = ARMS[arm]
        loaded = build(args.shape)
        rt = compress_model(loaded.model, make_codec(codec), policy=policy, policy_options=opts, placement=placement,
                            layers="all", progress=False, verify="never" if skip else "first")
        if skip:
            rt.codec.decode_many = lambda cts, outs: None
        models[arm], runtimes[arm] = loaded, rt
    torch.cuda.empty_cache()
    prompt = ["The capital of France is"]

    def gen(name):
        out = greedy_generate(models[name].model, models[name].tokenizer, prompt, args.tokens, args.tokens)
        if name in runtimes:
            runtimes[name].end_generation()
        return out

    ref = {name: gen(name) for name in models}  # warm-up (and first-pass verification)
    times = {name: [] for name in models}
    for rt in runtimes.values():
        rt.reset_stats()
    for r in range(args.rounds):
        names = list(models)
        for name in names[r % len(names):] + names[: r % len(names)]:
            torch.cuda.synchronize()
            t = time.perf_counter()
            gen(name)
            torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t)
    decode_host = {name: rt.stats.decompress_time_s / (args.rounds * args.tokens) for name, rt in runtimes.items()}
    rows = []
    for name in models:
        trace = os.path.join(args.out, f"trace_{name.replace(' ', '_').replace('=', '').replace(',', '')}.json")
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            torch.cuda.synchronize()
            t = time.perf_counter()
            gen(name)
            torch.cuda.synchronize()
            wall = time.perf_counter() - t
        prof.export_chrome_trace(trace)
        kernel_us, busy_us = busy_fraction(trace)
        with open(trace, "rb") as f, gzip.open(trace + ".gz", "wb") as g:
            g.write(f.read())
        os.remove(trace)
        ka = prof.key_averages()
        top_cpu = sorted(ka, key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
        top_gpu = sorted(ka, key=lambda e: e.self_device_time_total, reverse=True)[:6]
        exact = torch.equal(ref[name].logits, ref["baseline"].logits) if name != "baseline" else True
        med = statistics.median(times[name])
        row = {"arm": name, "ms_per_token": 1e3 * med / args.tokens,
               "ms_per_token_min_max": [1e3 * min(times[name]) / args.tokens, 1e3 * max(times[name]) / args.tokens],
               "profiled_ms_per_token": 1e3 * wall / args.tokens, "gpu_kernel_ms_per_token": kernel_us / 1e3 / args.tokens,
               "gpu_busy_ms_per_token": busy_us / 1e3 / args.tokens, "exact": exact,
               "decode_host_ms_per_token": 1e3 * decode_host[name] if name in runtimes else None,
               "top_cpu_ms_per_token": {e.key: round(e.self_cpu_time_total / 1e3 / args.tokens, 3) for e in top_cpu},
               "top_gpu_ms_per_token": {e.key[:60]: round(e.self_device_time_total / 1e3 / args.tokens, 3) for e in top_gpu}}
        rows.append(row)
        with open(os.path.join(args.out, "profile.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
    base = rows[0]["ms_per_token"]
    print(f"{torch.cuda.get_device_name()}, {args.shape}, b=1, {args.tokens} tokens, {args.rounds} interleaved rounds")
    print(f"{'arm':32} {'ms/token':>9} {'x base':>7} {'min-max':>13} {'GPU kernels':>11} {'GPU busy':>9} {'decode host':>11} exact")
    for r in rows:
        lo, hi = r["ms_per_token_min_max"]
        dh = f"{r['decode_host_ms_per_token']:.2f}" if r["decode_host_ms_per_token"] is not None else "-"
        print(f"{r['arm']:32} {r['ms_per_token']:9.2f} {base / r['ms_per_token']:7.3f} {lo:6.2f}-{hi:6.2f} "
              f"{r['gpu_kernel_ms_per_token']:11.2f} {r['gpu_busy_ms_per_token']:9.2f} {dh:>11} {r['exact']}")
    for r in rows:
        print(r["arm"], "top host ops (ms/token):", r["top_cpu_ms_per_token"])
        print(r["arm"], "top GPU ops (ms/token):", r["top_gpu_ms_per_token"])


if __name__ == "__main__":
    main()
