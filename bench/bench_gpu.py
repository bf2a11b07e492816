"""GPU benchmark: compressed-weight inference against bf16 baseline and accelerate's cpu_offload, one GPU.

    python bench/bench_gpu.py --shape llama_1b --batch 1 8 --tokens 32 --repeats 3 --out results.jsonl

Every variant goes through the harness's own measurement path (Lightning Trainer.predict + the phase callbacks:
CUDA-synchronised wall clock, median of repeats after a warm-up, peak memory reset per phase, exact counters),
on a freshly built random-init model of the real shape (nothing to download;
normal(0, 0.02) bf16 compresses like trained weights, see docs/physics.md). Bit-exactness: token
ids and every step's logits torch.equal to the baseline's. Rows are appended to --out as JSON lines as soon as
each is measured, and a table is printed last.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import machine  # noqa: E402  (bench/machine.py, next to this script)
import torch  # noqa: E402

from harness.checks import default_callbacks  # noqa: E402
from harness.codecs import make_codec  # noqa: E402
from harness.models import load_model  # noqa: E402
from harness.phases.module import GenerationModule  # noqa: E402
from harness.phases.paired import rounds_warmup, run_rounds  # noqa: E402
from harness.phases.phase import compare, run_phase  # noqa: E402
from harness.runtime import compress_model  # noqa: E402
from harness.selection import select_layers  # noqa: E402

PROTOTYPE_SHARE = 20 / 155  # the prototype compressed 20 of SmolLM2's 155 eligible layers


def callbacks():
    return default_callbacks()  # the run's own list (conf/callbacks/default.yaml)


def prompts(batch: int) -> list[str]:
    base = ["The capital of France is", "Lossless compression of weights", "Once upon a time",
            "The H100 has", "In 1905 Einstein", "A byte plane is", "Decoding on the GPU", "Tokens per second"]
    return [base[i % len(base)] + f" ({i})" * (i // len(base)) for i in range(batch)]


def build(shape: str):
    t = time.perf_counter()
    loaded = load_model({"kind": "synthetic", "name": shape, "shape": shape, "seed": 0, "dtype": "bfloat16"}, "cuda")
    return loaded, time.perf_counter() - t


@dataclass(frozen=True)
class Variant:
    """One compressed arm: a codec (with its own options only), a cache policy and its options, where the bytes
    live, and how many of the eligible layers (a share)."""

    codec: str
    policy: str
    options: dict = field(default_factory=dict)  # a "depth" of None: as many as are compressed (prefetch them all)
    placement: str = "cpu"
    share: float = 1.0
    threads: int = 1  # zstd / zipnn decode threads
    level: int = 3  # zstd level
    embeddings: bool = False  # also compress the (untied) embedding table
    slow: bool = False  # measured over --slow-tokens (CPU decode per token: minutes otherwise)


P = PROTOTYPE_SHARE
VARIANTS = {
    "prototype (zstd cpu, per_forward_pass)": Variant("zstd", "per_forward_pass", share=P, slow=True),
    "zstd_grouped cpu x16 threads, prefetch": Variant("zstd_grouped", "prefetch", {"depth": 4}, share=P, threads=16, slow=True),
    "zstd_grouped L1 cpu x4 threads, prefetch all x4 workers": Variant(
        "zstd_grouped", "prefetch", {"depth": None, "workers": 4}, share=P, threads=4, level=1, slow=True),
    "nvcomp cpu-placed, prefetch": Variant("nvcomp_ans", "prefetch", {"depth": 4}),
    "nvcomp gpu-placed, none": Variant("nvcomp_ans", "none", placement="gpu"),
    "nvcomp gpu-placed, prefetch": Variant("nvcomp_ans", "prefetch", {"depth": 2}, placement="gpu"),
    "nvcomp gpu-placed, block (batched)": Variant("nvcomp_ans", "block", placement="gpu"),
    "nvcomp cpu-placed, block": Variant("nvcomp_ans", "block"),
    "nvcomp gpu-placed, block ahead (double-buffered)": Variant("nvcomp_ans", "block", {"ahead": 1}, placement="gpu"),
    "nvcomp cpu-placed, block ahead (double-buffered)": Variant("nvcomp_ans", "block", {"ahead": 1}),
    # nvCOMP's batched C API with prebuilt pointer tables (harness/codecs/nvcomp_batched.py)
    "ans-batched gpu-placed, none": Variant("nvcomp_ans_batched", "none", placement="gpu"),
    "ans-batched gpu-placed, block": Variant("nvcomp_ans_batched", "block", placement="gpu"),
    "ans-batched gpu-placed, block ahead": Variant("nvcomp_ans_batched", "block", {"ahead": 1}, placement="gpu"),
    "ans-batched cpu-placed, block": Variant("nvcomp_ans_batched", "block"),
    "ans-batched cpu-placed, block ahead": Variant("nvcomp_ans_batched", "block", {"ahead": 1}),
    "ans-batched cpu-placed, prefetch": Variant("nvcomp_ans_batched", "prefetch", {"depth": 4}),
    "ans-batched gpu-placed, block + embeddings": Variant("nvcomp_ans_batched", "block", placement="gpu", embeddings=True),
    "ans-batched gpu-placed, block ahead + embeddings": Variant(
        "nvcomp_ans_batched", "block", {"ahead": 1}, placement="gpu", embeddings=True),
    "zstd_grouped L1 cpu x2 threads, prefetch all x8 workers": Variant(
        "zstd_grouped", "prefetch", {"depth": None, "workers": 8}, share=P, threads=2, level=1, slow=True),
}


def make_runtime(model, variant: str, eligible: int):
    v = VARIANTS[variant]
    n = max(1, round(v.share * eligible))
    opts = {k: (n if val is None else val) for k, val in v.options.items()}
    # Each codec takes only its own options: level and threads are zstd's (zipnn: threads), GPU codecs take neither.
    kw = {"level": v.level, "threads": v.threads} if v.codec.startswith("zstd") else {}
    kw = {"threads": v.threads} if v.codec == "zipnn" else kw
    rt = compress_model(model, make_codec(v.codec, **kw), policy=v.policy, policy_options=opts, attach=False,
                        placement=v.placement, layers=n, progress=False, embeddings=v.embeddings)  # fmt: skip
    return rt, n


def tokens_for(variant: str, args) -> int:
    return args.slow_tokens if VARIANTS[variant].slow and args.slow_tokens else args.tokens


def measure(module, batch, args, name):
    accelerator = "gpu" if torch.cuda.is_available() else "cpu"  # cpu: smoke tests of this script only
    res = run_phase(name, module, callbacks(), prompts(batch), args.repeats, 1, accelerator, progress=False)
    return res


def row_of(shape, batch, variant, res, base, extra):
    d = res.as_dict()
    r = {
        "shape": shape, "batch": batch, "variant": variant, "tok_s": d["tokens_per_s"], "time_s": d["time_s"],
        "time_s_min": d["time_s_min"], "time_s_max": d["time_s_max"], "peak_bytes": d["memory"]["peak_bytes"],
        "weights_vram_bytes": d["memory"]["weights_bytes"], "forward_passes": d["forward_passes"],
        "decompressions_per_pass": d.get("decompressions_per_forward_pass"), **extra,
    }
    if base is not None:
        c = compare(base, res)
        r.update(bit_exact=c["outputs_match"], speed_vs_base=1 / c["slowdown"], peak_vs_base=c["peak_memory_ratio"],
                 weights_vs_base=c["weights_bytes_ratio"])
    return r


def interleaved(args) -> None:
    """A/B with the host's drift paired out: a dense model and one compressed model per arm side by side on the
    GPU, alternated through harness.phases.paired.run_rounds (the code `python -m harness` runs): a warm-up
    round, then --rounds rounds of one generation per arm, the order rotated per round; each arm's speed is the
    median of its per-round ratios to the baseline, with their quartiles."""
    dense, _ = build(args.shape)
    modules = {"baseline": GenerationModule(dense.model, dense.tokenizer, args.tokens, args.tokens)}
    for arm in args.ab:
        comp, _ = build(args.shape)
        rt, _ = make_runtime(comp.model, arm, len(select_layers(comp.model, "all").chosen))
        modules[arm] = GenerationModule(comp.model, comp.tokenizer, args.tokens, args.tokens)
        modules[arm].runtime = rt
        gc.collect(); torch.cuda.empty_cache()
    arms = list(modules)
    accelerator = "gpu" if torch.cuda.is_available() else "cpu"  # cpu: smoke tests of this script only
    for b in args.batch:
        paired = run_rounds(modules, {k: callbacks() for k in arms}, prompts(b), args.rounds, rounds_warmup(1, False),
                            accelerator, mechanism="one model per arm")
        base = paired.side_dict("baseline")
        for k in arms[1:]:
            comp, ratio = paired.side_dict(k), paired.ratios[k]
            stats = [paired.records[k].runtime_stats[i] for i in paired.timed(k)]
            row = {"shape": args.shape, "batch": b, "variant": f"A/B interleaved: {k}", "rounds": args.rounds,
                   "arms": arms, "baseline_time_s": base["time_s"], "compressed_time_s": comp["time_s"],
                   "baseline_min_max_s": [min(base["times_s"]), max(base["times_s"])],
                   "compressed_min_max_s": [min(comp["times_s"]), max(comp["times_s"])],
                   "baseline_gpu_time_s": base["gpu_time_s"], "compressed_gpu_time_s": comp["gpu_time_s"],
                   "speed_vs_base": ratio["speed_ratio"], "speed_vs_base_iqr": [ratio["speed_ratio_q1"], ratio["speed_ratio_q3"]],
                   "speed_vs_base_per_round": ratio["speed_ratio_per_round"], "bit_exact": paired.exact[k],
                   "tok_s_baseline": b * args.tokens / base["time_s"], "tok_s_compressed": b * args.tokens / comp["time_s"],
                   # the runtime's host time to issue decodes, per generated token
                   "decompress_host_ms_per_token": 1e3 * sum(s["decompress_time_s"] for s in stats) / (len(stats) * args.tokens)}
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{args.shape} b={b} {k}: baseline {base['time_s']:.3f}s compressed {comp['time_s']:.3f}s -> "
                  f"{ratio['speed_ratio']:.3f}x baseline speed (paired IQR {ratio['speed_ratio_q1']:.3f}-"
                  f"{ratio['speed_ratio_q3']:.3f}, {args.rounds} rounds), exact {paired.exact[k]}, decode host "
                  f"{row['decompress_host_ms_per_token']:.2f} ms/token", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama_1b")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", nargs="*", default=None, help="substrings of variant names to run")
    ap.add_argument("--offload", action="store_true", help="also measure accelerate cpu_offload")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "bench_gpu.jsonl"))
    ap.add_argument("--ab", nargs="+", default=None, help="interleaved A/B of these variants against the baseline")
    ap.add_argument("--rounds", type=int, default=10, help="paired rounds of the --ab comparison")
    ap.add_argument("--slow-tokens", type=int, default=None,
                    help="tokens for the CPU-decode variants and accelerate's offload (each against its own baseline)")
    args = ap.parse_args()
    info = machine.describe()  # first line of the output: the rows below are this machine's
    print(machine.line(info), flush=True)
    with open(args.out, "a") as f:
        f.write(json.dumps({"machine": info}) + "\n")
    if args.ab:
        return interleaved(args)
    rows = []

    def emit(r):
        rows.append(r)
        with open(args.out, "a") as f:
            f.write(json.dumps(r) + "\n")
        print(json.dumps(r), flush=True)

    loaded, build_s = build(args.shape)
    print(f"built {args.shape} in {build_s:.1f} s on {torch.cuda.get_device_name()}", flush=True)
    baselines = {}  # (batch, tokens) -> baseline phase; slow variants run fewer tokens, against their own baseline
    for tokens in sorted({args.tokens, args.slow_tokens or args.tokens}, reverse=True):
        module = GenerationModule(loaded.model, loaded.tokenizer, tokens, tokens)
        for b in args.batch:
            baselines[(b, tokens)] = measure(module, b, args, "baseline")
            emit(row_of(args.shape, b, "baseline bf16", baselines[(b, tokens)], None, {"tokens": tokens}))
        module.close()
    eligible = len(select_layers(loaded.model, "all").chosen)
    del module, loaded
    gc.collect(); torch.cuda.empty_cache()

    for variant in VARIANTS:
        if args.variants and not any(s in variant for s in args.variants):
            continue
        loaded, _ = build(args.shape)
        try:
            rt, n = make_runtime(loaded.model, variant, eligible)
            gc.collect(); torch.cuda.empty_cache()
            tokens = tokens_for(variant, args)
            module = GenerationModule(loaded.model, loaded.tokenizer, tokens, tokens)
            module.runtime = rt
            for b in args.batch:
                res = measure(module, b, args, "compressed")
                emit(row_of(args.shape, b, variant, res, baselines[(b, tokens)], {"tokens": tokens,
                    "layers": f"{n}/{rt.report.layers_total}", "ratio": rt.report.compression_ratio,
                    "decompress_host_s": res.as_dict().get("decompress_time_s")}))
            rt.close()
            module.close()
            del module, rt  # nothing of this variant may stay alive into the next one's memory figures
        except Exception as e:  # a failed variant is a row, not the end of the benchmark
            emit({"shape": args.shape, "variant": variant, "error": f"{type(e).__name__}: {e}"[:300]})
        del loaded
        gc.collect(); torch.cuda.empty_cache()

    if args.offload:
        from accelerate import cpu_offload
        loaded, _ = build(args.shape)
        loaded.model.to("cpu")
        cpu_offload(loaded.model, execution_device=0)
        gc.collect(); torch.cuda.empty_cache()
        tokens = args.slow_tokens or args.tokens
        module = GenerationModule(loaded.model, loaded.tokenizer, tokens, tokens)
        for b in args.batch[:1]:
            res = measure(module, b, args, "offload")
            emit(row_of(args.shape, b, "accelerate cpu_offload (bf16)", res, baselines[(b, tokens)], {"tokens": tokens}))

    print(f"\n{torch.cuda.get_device_name()}")
    print(f"{'shape':9} {'b':>2} {'variant':56} {'tok/s':>8} {'x base':>7} {'peak GB':>8} {'x base':>6} {'wVRAM x':>7} {'dec/pass':>8} exact")
    for r in rows:
        if "error" in r:
            print(f"{r['shape']:9}    {r['variant']:56} ERROR {r['error'][:80]}")
            continue
        print(f"{r['shape']:9} {r['batch']:>2} {r['variant']:56} {r['tok_s']:8.2f} {r.get('speed_vs_base', 1):7.3f} "
              f"{r['peak_bytes'] / 1e9:8.3f} {r.get('peak_vs_base', 1):6.3f} {r.get('weights_vs_base', 1):7.3f} "
              f"{(r['decompressions_per_pass'] or 0):8.1f} {'✓' if r.get('bit_exact', True) else '✗'}")


if __name__ == "__main__":
    main()
