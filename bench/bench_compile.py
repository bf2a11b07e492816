"""Compressed weights in the fastest dense stack: eager and compiled (static cache + CUDA graphs), one GPU.

    python bench/bench_compile.py --shape llama_1b --batch 1 8 --tokens 64 --rounds 5 --out results.jsonl

Arms, all resident at once on one GPU and timed in alternated rounds (harness.rounds: each round one generation
of every arm, the order rotated), so every ratio compares generations that ran side by side:
  dense_eager        HF generate, dynamic cache
  dense_compiled     generate(cache_implementation="static"): transformers compiles the decode step
                     (torch.compile mode="reduce-overhead": Inductor + CUDA graphs)
  block_eager        nvcomp_ans_batched, bytes in VRAM, cache=block (the eager runtime)
  block_compiled     the same weights through the capturable block policy, compiled like dense_compiled
  none_compiled      the capturable none policy (each layer decoded at its use), compiled
  fused_compiled     cache=fused: every linear layer in lut3 (codec fused_lut3), decoded in registers inside the
                     GEMV (harness/fused/lut3_kernel.cu), compiled; warps per tile by lut3_cuda.warps_per_tile;
                     a prompt of up to 32 tokens in one launch of the wide build (cache.prefill_tokens' default)
  fused_decoded_compiled
                     the same with cache.prefill_tokens=0: the eager prefill decodes each layer for F.linear (the
                     default until 2026-12-07, so fused_compiled in rows before then)
  fused_eager        the same, eager
  fused_ref_compiled the same policy inside its reference(): the lut3 kernel fed the uncompressed weights, the
                     exactness reference of fused_compiled
  fused_sliced_compiled, fused_sliced_ref_compiled
                     the same two with cache.prefill_slices=--prefill-slices: a prompt of up to 8 x that many
                     tokens is multiplied in the kernel 8 tokens a launch, instead of decoded for cuBLAS
  fused_wide_compiled, fused_wide_ref_compiled
                     the same two with cache.prefill_tokens=--prefill-tokens: a prompt of up to that many tokens
                     (at most 32) multiplied in one launch of the kernel's wide build (at 32, the default: the same
                     as fused_compiled and fused_ref_compiled)
  fused_lane_compiled, fused_ballot_compiled, fused_chunk_compiled, fused_prefetch_compiled
                     fused_compiled with cache.kernel=lane|ballot|chunk|prefetch (the fused kernel's families): an
                     A/B of the kernels inside the whole model; each family's logits must equal fused_compiled's and
                     fused_lane_compiled's (the same arithmetic), and speeds are paired against both
  fused_pdl_compiled, fused_pdl_ref_compiled
                     fused_compiled and its reference with cache.pdl=true (programmatic dependent launch: a launch
                     may start while the kernel before it finishes); the logits must equal fused_compiled's
  (the fused_* arms compile in Inductor's deterministic mode, as the harness compiles a phase with an exactness
  reference: harness.generation.deterministic_compile)
  block_*_emb        the same with the (untied) embedding table compressed too
  dense_compiled_ref dense, compiled, its lookup behind an opaque op: the exactness reference of
                     block_compiled_emb (Inductor fuses a plain lookup into the first RMSNorm, which rounds
                     differently from the same RMSNorm on an op's output)
Exactness is checked against dense_compiled and dense_eager (token ids, and every logit with torch.equal).
GB moved per generation step: the weight bytes a step reads (and, decompressing, writes and reads again), and the
bandwidth that implies at the measured speed. Rows go to --out as JSON lines as they are measured.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from harness.codecs import make_codec  # noqa: E402
from harness.generation import greedy_generate  # noqa: E402
from harness.measure import model_weight_bytes  # noqa: E402
from harness.models import load_model  # noqa: E402
from harness.phases.compiled import compile_details, reset_compile_counters  # noqa: E402
from harness.rounds import alternate, paired_speed_ratio, quartiles, timed  # noqa: E402
from harness.runtime import CompressedEmbedding, CompressedLinear, compress_model  # noqa: E402
from harness.runtime.captured import OpaqueEmbedding  # noqa: E402
from harness.selection import select_layers  # noqa: E402

BASE_PROMPTS = [
    "The capital of France is",
    "Lossless compression of weights",
    "Once upon a time",
    "The H200 has",
    "In 1905 Einstein",
    "A byte plane is",
    "Decoding on the GPU",
    "Tokens per second",
]


def prompts(batch: int) -> list[str]:
    return [BASE_PROMPTS[i % len(BASE_PROMPTS)] for i in range(batch)]


def step_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes a dense step reads, bytes the same step moves with decompress-then-matmul): every parameter once
    (an untied embedding table contributes only its looked-up rows: ~0), compressed layers' compressed bytes read
    + dense bytes written + read again."""
    dense = moved = 0
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, CompressedLinear):
            dense += module.weight_nbytes
            fused = module.ct.codec == "fused_lut3"  # read once in the kernel: nothing written, nothing read again
            moved += module.ct.compressed_nbytes + (0 if fused else 2 * module.weight_nbytes)
        elif isinstance(module, CompressedEmbedding):
            continue
        else:
            for p in module.parameters(recurse=False):
                if id(p) in seen or (isinstance(module, torch.nn.Embedding) and not _tied(model, p)):
                    continue
                seen.add(id(p))
                dense += p.nbytes
                moved += p.nbytes
    return dense, moved


def _tied(model, p) -> bool:
    head = getattr(model, "lm_head", None)
    return head is not None and getattr(head, "weight", None) is p


def weights_on_device(model) -> int:
    """Dense weights plus the compressed bytes held in VRAM (as the harness counts `weights_bytes`)."""
    total = model_weight_bytes(model)
    for m in model.modules():
        if isinstance(m, (CompressedLinear, CompressedEmbedding)) and m.ct.payload.device.type == "cuda":
            total += m.ct.compressed_nbytes
    return total


def warps_of(rt, batches) -> dict[str, int] | None:
    """The fused kernel's warps per tile for each layer shape and batch (recorded with the row: it sets the split-K,
    so the arithmetic); None for other policies."""
    packed = getattr(rt.policy, "_packed", None)
    if not packed:
        return None
    from harness.fused import lut3_cuda

    shapes = {(tuple(p.shape), p.tiles, p.iters) for p in packed.values()}
    return {f"{s[0]}x{s[1]}@{b}": lut3_cuda.warps_per_tile(t, i, b) for s, t, i in sorted(shapes) for b in batches}


def jsonl_writer(path: str):
    """emit(row): the row appended to `path` as a JSON line, flushed (a run killed at its time limit keeps every
    row it measured), and printed without its lists."""
    out = open(path, "a")

    def emit(row: dict) -> None:
        out.write(json.dumps(row) + "\n")
        out.flush()
        print(json.dumps({k: v for k, v in row.items() if not isinstance(v, list)}), flush=True)

    return emit


def profile_one(fn, tokens: int, top: int = 12, host: bool = False) -> dict:
    """CUDA time per step by kernel name over one generation (torch.profiler): where a step's time goes.
    host: also the host's self time by op (CPU activity), to find host-bound phases such as the eager prefill."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA, *([ProfilerActivity.CPU] if host else [])]
    with profile(activities=activities) as prof:
        fn()
        torch.cuda.synchronize()
    per, cpu = {}, {}
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        # with CPU activity, the host ops that launch kernels carry device time too: count the kernels only
        if t > 0 and (not host or e.device_type == torch.autograd.DeviceType.CUDA):
            per[e.key[:80]] = (t / tokens, e.count / tokens)
        if host and e.self_cpu_time_total > 0:
            cpu[e.key[:80]] = (e.self_cpu_time_total / tokens, e.count / tokens)
    total = sum(t for t, _ in per.values())
    rows = sorted(per.items(), key=lambda kv: -kv[1][0])[:top]
    out = {"cuda_us_per_step": total, "launches_per_step": sum(c for _, c in per.values()),
           "top": [[k, round(t, 1), round(c, 2)] for k, (t, c) in rows]}
    if host:
        out["host_self_us_per_step"] = sum(t for t, _ in cpu.values())
        out["host_top"] = [[k, round(t, 1), round(c, 2)] for k, (t, c) in sorted(cpu.items(), key=lambda kv: -kv[1][0])[:top]]
    return out


# arm -> (policy, captured, embeddings compressed): nvcomp_ans_batched, decompress then matmul
BLOCK_ARMS = {
    "block_eager": ("block", False, False),
    "block_compiled": ("block", True, False),
    "none_compiled": ("none", True, False),
    "block_eager_emb": ("block", False, True),
    "block_compiled_emb": ("block", True, True),
}
# arm -> (compiled, inside the policy's reference(), cache options; "sliced"/"wide": the --prefill-* routes)
FUSED_ARMS = {
    "fused_compiled": (True, False, {}),
    "fused_eager": (False, False, {}),
    "fused_ref_compiled": (True, True, {}),
    "fused_decoded_compiled": (True, False, {"prefill_tokens": 0}),
    "fused_sliced_compiled": (True, False, "sliced"),
    "fused_sliced_ref_compiled": (True, True, "sliced"),
    "fused_wide_compiled": (True, False, "wide"),
    "fused_wide_ref_compiled": (True, True, "wide"),
    # the kernel families (cache.kernel), paired with fused_compiled
    "fused_lane_compiled": (True, False, {"kernel": "lane"}),
    "fused_ballot_compiled": (True, False, {"kernel": "ballot"}),
    "fused_chunk_compiled": (True, False, {"kernel": "chunk"}),
    "fused_prefetch_compiled": (True, False, {"kernel": "prefetch"}),
    # programmatic dependent launch (cache.pdl), paired with fused_compiled; its logits must equal fused_compiled's
    "fused_pdl_compiled": (True, False, {"pdl": True}),
    "fused_pdl_ref_compiled": (True, True, {"pdl": True}),
}
ARMS = ("dense_eager", "dense_compiled", "dense_compiled_ref", *BLOCK_ARMS, *FUSED_ARMS)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama_1b")
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument(
        "--arms",
        nargs="+",
        choices=ARMS,  # a misspelt arm is an error at once, not an arm silently left out of a 10-minute device call
        default=["dense_eager", "dense_compiled", "block_eager", "block_compiled", "none_compiled"],
        metavar="ARM",
        help="arms to build and time (the module docstring says what each is)",
    )
    ap.add_argument("--out", default="bench_compile.jsonl")
    ap.add_argument("--prefill-slices", type=int, default=4,
                    help="cache.prefill_slices of the fused_sliced_* arms: prompts of up to 8 x this many tokens in the kernel")
    ap.add_argument("--prefill-tokens", type=int, default=32,
                    help="cache.prefill_tokens of the fused_wide_* arms: prompts of up to this many tokens in one launch")
    ap.add_argument("--profile", nargs="*", default=[], help="arms to profile (torch.profiler, one generation)")
    ap.add_argument("--profile-prefill", nargs="*", default=[],
                    help="arms whose prefill (a one-token generation) to profile, host self time by op included")
    ap.add_argument("--split", action="store_true",
                    help="also time the prefill alone (1 new token) per arm: prefill_s and step_s = the rest per token")
    args = ap.parse_args()
    torch._dynamo.config.cache_size_limit = 64  # several compiled models share transformers' code objects
    emit = jsonl_writer(args.out)
    device = torch.device("cuda")
    card = torch.cuda.get_device_name(device)
    t = time.perf_counter()
    dense = load_model(
        {"kind": "synthetic", "name": args.shape, "shape": args.shape, "seed": 0, "dtype": "bfloat16"}, device
    )
    emit(
        {
            "event": "loaded",
            "shape": args.shape,
            "card": card,
            "load_s": time.perf_counter() - t,
            "torch": torch.__version__,
            "driver": torch.version.cuda,
        }
    )
    tok = dense.tokenizer
    models = {"dense_eager": (dense.model, False, None), "dense_compiled": (dense.model, True, None)}
    if "dense_compiled_ref" in args.arms and not dense.model.config.tie_word_embeddings:
        # the exactness reference of block_compiled_emb: the dense lookup behind an opaque op (captured.py)
        ref_model = copy.deepcopy(dense.model)
        ref_model.model.embed_tokens = OpaqueEmbedding(ref_model.model.embed_tokens)
        models["dense_compiled_ref"] = (ref_model, True, None)
    encoded: dict = {}
    encoded_lut3: dict = {}
    stack = contextlib.ExitStack()  # the reference arm's policy stays in reference() until the end
    for arm, (policy, captured, embeddings) in BLOCK_ARMS.items():
        if arm not in args.arms:
            continue
        t = time.perf_counter()
        model = copy.deepcopy(dense.model)
        sel = select_layers(model, "all", embeddings=embeddings)
        have = {c.name for c in sel.chosen} <= set(encoded)
        rt = compress_model(
            model,
            make_codec("nvcomp_ans_batched"),
            selection=sel,
            policy=policy,
            placement="gpu",
            precompressed=encoded if have else None,
            captured=captured,
            attach=True,
            progress=False,
        )
        torch.cuda.synchronize()
        encoded.update({layer.name: layer.ct for layer in rt.layers})  # encode once, share the bytes
        models[arm] = (model, captured, rt)
        emit(
            {
                "event": "compressed",
                "arm": arm,
                "s": time.perf_counter() - t,
                "ratio": rt.report.compression_ratio,
                "layers": f"{rt.report.layers_compressed}/{rt.report.layers_total}",
            }
        )
    routes = {"sliced": {"prefill_slices": args.prefill_slices, "prefill_tokens": 0},
              "wide": {"prefill_tokens": args.prefill_tokens}}
    for arm, (compile_, reference, options) in FUSED_ARMS.items():
        options = routes[options] if isinstance(options, str) else options
        if arm not in args.arms:
            continue
        t = time.perf_counter()
        model = copy.deepcopy(dense.model)
        sel = select_layers(model, "all")
        have = {c.name for c in sel.chosen} <= set(encoded_lut3)
        rt = compress_model(model, make_codec("fused_lut3"), selection=sel, policy="fused", placement="gpu",
                            precompressed=encoded_lut3 if have else None, captured=compile_, attach=True,
                            policy_options=options, progress=False)  # fmt: skip
        encoded_lut3.update({layer.name: layer.ct for layer in rt.layers})
        if reference:
            stack.enter_context(rt.policy.reference())
        torch.cuda.synchronize()
        models[arm] = (model, compile_, rt)
        emit({"event": "compressed", "arm": arm, "s": time.perf_counter() - t, "ratio": rt.report.compression_ratio,
              "layers": f"{rt.report.layers_compressed}/{rt.report.layers_total}",
              "warps_per_tile": warps_of(rt, args.batch)})  # fmt: skip
    gc.collect()
    arms = [a for a in args.arms if a in models]

    for batch in args.batch:
        ps = prompts(batch)

        def run(arm, ps=ps, tokens=args.tokens):
            model, compile_, rt = models[arm]
            if rt is not None:
                rt.reset_stats()
            # the harness's rule (GenerationModule.deterministic_compile): a policy with an exactness reference
            # compiles in Inductor's deterministic mode, or its reference could differ by Inductor's own choices
            g = greedy_generate(model, tok, ps, tokens, min_new_tokens=tokens, device=device, compile=compile_,
                                deterministic=rt is not None and hasattr(rt.policy, "reference"))  # fmt: skip
            if rt is not None:
                rt.end_generation()
            return g

        warm = {}
        for arm in arms:  # warm-up: compilation, cuBLAS heuristics, CUDA-graph recording, pointer tables
            reset_compile_counters()
            t = time.perf_counter()
            for _ in range(3):
                run(arm)
            torch.cuda.synchronize()
            warm[arm] = {"warmup_s": time.perf_counter() - t, **compile_details()}
        times = {arm: [] for arm in arms}
        gpu = {arm: [] for arm in arms}
        outs = {}
        for order in alternate(arms, args.rounds):
            for arm in order:
                g, timing = timed(lambda arm=arm: run(arm), device)
                times[arm].append(timing.wall_s)
                gpu[arm].append(timing.gpu_s)
                outs[arm] = g
        refs = {
            name: outs.get(name)
            for name in ("dense_compiled", "dense_eager", "dense_compiled_ref", "fused_ref_compiled",
                         "fused_sliced_ref_compiled", "fused_wide_ref_compiled", "fused_compiled",
                         "fused_lane_compiled", "fused_pdl_ref_compiled")  # fmt: skip
        }
        for arm in arms:
            model, compile_, rt = models[arm]
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            run(arm)
            torch.cuda.synchronize()
            transient = torch.cuda.max_memory_allocated() - before
            weights = weights_on_device(model)
            dense_b, moved_b = step_bytes(model)
            q1, med, q3 = quartiles(times[arm])
            tok_s = batch * args.tokens / med
            g = outs[arm]
            row = {
                "event": "row",
                "shape": args.shape,
                "card": card,
                "batch": batch,
                "tokens": args.tokens,
                "arm": arm,
                "compiled": compile_,
                "time_s": med,
                "time_s_q1": q1,
                "time_s_q3": q3,
                "tok_s": tok_s,
                "gpu_time_s": quartiles(gpu[arm])[1],
                "times_s": times[arm],
                "weights_bytes": weights,
                "peak_bytes": weights + transient,
                "transient_bytes": transient,
                "step_dense_bytes": dense_b,
                "step_moved_bytes": moved_b,
                "gb_per_step": moved_b / 1e9,
                "implied_gbps": moved_b / 1e9 * (args.tokens / med),
                **warm[arm],
            }
            for name, ref in refs.items():
                if ref is not None:
                    row[f"tokens_equal_{name}"] = g.new_token_ids == ref.new_token_ids
                    row[f"logits_equal_{name}"] = bool(torch.equal(g.logits, ref.logits))
                    row[f"max_dlogit_{name}"] = (g.logits.float() - ref.logits.float()).abs().max().item()
                    row[f"first_step_differ_{name}"] = first_step_differ(g.logits, ref.logits)
            for name in ("dense_compiled", "dense_eager", "block_eager", "block_compiled", "fused_compiled",
                         "fused_decoded_compiled", "fused_lane_compiled"):
                if name in times and name != arm:
                    r = paired_speed_ratio(times[name], times[arm])
                    row[f"vs_{name}"] = r["speed_ratio"]
                    row[f"vs_{name}_iqr"] = [r["speed_ratio_q1"], r["speed_ratio_q3"]]
            if rt is not None:  # the counts of the generation just measured (before the split's 1-token runs)
                snap = rt.stats.snapshot()
                row.update(decompressions=snap["decompressions"], passes=snap["forward_passes"],
                           per_pass=sorted(set(snap["decompressions_per_pass"])),
                           in_kernel_decodes=snap.get("in_kernel_decodes"),
                           in_kernel_per_pass=sorted(set(snap.get("in_kernel_decodes_per_pass") or [])))  # fmt: skip
            if args.split:  # where a generation's time goes: the (eager) prefill, then the decode steps
                pre = [timed(lambda arm=arm: run(arm, tokens=1), device)[1].wall_s for _ in range(3)]
                row["prefill_s"] = quartiles(pre)[1]
                row["step_s"] = (med - row["prefill_s"]) / max(1, args.tokens - 1)
            if arm in args.profile:
                row["profile"] = profile_one(lambda arm=arm: run(arm), args.tokens)
            if arm in args.profile_prefill:  # one token: the eager prefill alone, host ops included
                row["profile_prefill"] = profile_one(lambda arm=arm: run(arm, tokens=1), 1, top=20, host=True)
            emit(row)
    for arm in arms:  # the bytes every fused arm read by address, checked again after all the runs
        rt = models[arm][2]
        if rt is not None and getattr(rt.policy, "name", None) == "fused":
            emit({"event": "integrity_after", "arm": arm, **integrity_after(rt)})
    stack.close()


def first_step_differ(a: torch.Tensor, b: torch.Tensor) -> int | None:
    """The first generation step whose logits differ (None: none does): a prefill-only difference reads 0."""
    if a.shape != b.shape:
        return 0
    differ = (a != b).flatten(1).any(dim=1).nonzero()
    return int(differ[0]) if len(differ) else None


def integrity_after(rt) -> dict:
    """Each layer decoded again (the kernel's own decode) against its original's checksum, and, inside
    reference(), the reference's own copy of W too: after the timed runs, so that a run whose fused arm and
    reference part says whether any bytes changed under them."""
    from harness.codecs.base import checksum

    bad, bad_ref = [], []
    policy = rt.policy
    for layer in rt.linear_layers:
        if checksum(rt.codec.decode(layer.ct)) != layer.ct.checksum:
            bad.append(layer.name)
        if policy._reference is not None and checksum(policy._reference_weight(layer)) != layer.ct.checksum:
            bad_ref.append(layer.name)
    return {"layers": len(rt.linear_layers), "decode_fails": bad[:8], "decode_fails_n": len(bad),
            "reference_fails": bad_ref[:8], "reference_fails_n": len(bad_ref)}  # fmt: skip


if __name__ == "__main__":
    main()
