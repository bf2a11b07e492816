"""The eager prefill's host cost with cache=fused, arms alternated in rounds, one GPU:

    python bench/prefill_host.py --shape llama_8b --rounds 10 --out prefill_host.jsonl

transformers runs a generation's prefill eagerly even when it compiles the decode step, so at batch 1 the prefill
is one Python call per layer. Arms (one forward over the bench prompt, logits of the last token only):
  dense          the uncompressed model
  fused          cache=fused with cache.prefill_tokens=0 (the default until 2026-12-07): each layer decoded by its
                 prepared launch, then F.linear
  fused_before   the route before prepared launches: the codec's decode per layer (views of the payload built
                 per call) and torch's NVRTC launcher (libcuda opened and the argument array built per launch)
  fused_sliced   cache.prefill_slices=4: the prompt multiplied in the kernel 8 tokens a launch, no decode
  fused_wide     cache.prefill_tokens=32 (the default now): the prompt multiplied in one launch of the kernel's wide
                 build, no decode
  dense_generate, fused_generate, fused_wide_generate
                 a one-token greedy_generate with the static cache and generate.compile=true (the fused side in
                 Inductor's deterministic mode), as bench_compile's --split times a prefill: the forward plus
                 generate's own set-up (tokenizing, the cache, the logits kept)
Each arm's per-forward wall time (device synchronised), the fused arms' logits against fused's (equal for
fused_before: the same decode, the same matmul; not for fused_sliced and fused_wide, whose arithmetic is the
kernel's) and their largest difference from dense's, and a cProfile of one forward per fused arm (the top functions by own
time) go to --out as JSON lines.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import cProfile
import io
import os
import pstats
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from bench_compile import jsonl_writer, prompts  # noqa: E402

from harness.codecs import make_codec  # noqa: E402
from harness.fused import lut3_cuda  # noqa: E402
from harness.generation import greedy_generate  # noqa: E402
from harness.models import load_model  # noqa: E402
from harness.rounds import alternate, paired_speed_ratio, quartiles, timed  # noqa: E402
from harness.runtime import compress_model  # noqa: E402
from harness.selection import select_layers  # noqa: E402


def _torch_launcher_decode(p, out=None):
    """decode_gpu as it was: torch's launcher, every argument converted per call."""
    n, k = p.shape
    out = torch.empty((n, k), dtype=torch.bfloat16, device=p.device) if out is None else out
    warps = p.tiles * -(-p.iters // lut3_cuda.DECODE_CHUNK)
    lut3_cuda.kernels()["lut3_decode"](grid=(-(-warps // 4), 1, 1), block=(128, 1, 1),
                                       args=[*lut3_cuda.addresses(p), *p.lut_words(), out.view(torch.int32), n, k,
                                             p.tiles, p.iters, lut3_cuda.DECODE_CHUNK],
                                       shared_mem=4 * 16 * lut3_cuda._DECODE_ROW_BYTES)  # fmt: skip
    return out


@contextlib.contextmanager
def _before(policy):
    saved, decode = policy._decode, lut3_cuda.decode_gpu
    policy._decode, lut3_cuda.decode_gpu = {}, _torch_launcher_decode
    try:
        yield
    finally:
        policy._decode, lut3_cuda.decode_gpu = saved, decode


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama_8b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--out", default="prefill_host.jsonl")
    args = ap.parse_args()
    emit = jsonl_writer(args.out)
    device = torch.device("cuda")
    dense = load_model({"kind": "synthetic", "name": args.shape, "shape": args.shape, "seed": 0,
                        "dtype": "bfloat16"}, device)  # fmt: skip
    ids = dense.tokenizer(prompts(args.batch), return_tensors="pt", padding=True).input_ids.to(device)
    model = copy.deepcopy(dense.model)
    rt = compress_model(model, make_codec("fused_lut3"), selection=select_layers(model, "all"), policy="fused",
                        placement="gpu", attach=True, policy_options={"prefill_tokens": 0},
                        progress=False)  # fmt: skip
    policy = rt.policy
    routing = (policy._kernel_tokens, policy._per_launch)

    def routed(kernel_tokens: int, per_launch: int):
        """The policy as cache.prefill_slices / prefill_tokens would build it (the same layers and launches)."""

        @contextlib.contextmanager
        def ctx():
            policy._kernel_tokens, policy._per_launch = kernel_tokens, per_launch
            try:
                yield
            finally:
                policy._kernel_tokens, policy._per_launch = routing

        return ctx

    per, wide = lut3_cuda.MAX_TOKENS, lut3_cuda.WIDE_TOKENS
    sliced, widened, plain = routed(per * 4, per), routed(wide, wide), contextlib.nullcontext
    # arm -> (model, the policy's routing, whether a one-token generate rather than a forward)
    arms = {"dense": (dense.model, plain, False), "fused": (model, plain, False),
            "fused_before": (model, lambda: _before(policy), False), "fused_sliced": (model, sliced, False),
            "fused_wide": (model, widened, False), "dense_generate": (dense.model, plain, True),
            "fused_generate": (model, plain, True), "fused_wide_generate": (model, widened, True)}  # fmt: skip

    @torch.no_grad()
    def run(arm):
        m, ctx, generate = arms[arm]
        if generate:
            rt.reset_stats()
            with ctx():
                g = greedy_generate(m, dense.tokenizer, prompts(args.batch), 1, min_new_tokens=1, device=device,
                                    compile=True, deterministic=m is model)  # fmt: skip
            rt.end_generation()
            return g.logits[0]
        with ctx():
            logits = m(input_ids=ids, logits_to_keep=1, use_cache=False).logits
        rt.end_generation()
        return logits[:, -1]

    for arm in arms:  # warm-up: cuBLAS heuristics, kernel compilation
        for _ in range(3):
            run(arm)
    times = {arm: [] for arm in arms}
    logits = {}
    for order in alternate(list(arms), args.rounds):
        for arm in order:
            logits[arm], t = timed(lambda arm=arm: run(arm), device)
            times[arm].append(t.wall_s)
    for arm in arms:
        q1, med, q3 = quartiles(times[arm])
        row = {"event": "row", "shape": args.shape, "batch": args.batch, "prompt_tokens": ids.shape[1], "arm": arm,
               "card": torch.cuda.get_device_name(device), "torch": torch.__version__, "prefill_s": med,
               "prefill_s_q1": q1, "prefill_s_q3": q3, "times_s": times[arm]}  # fmt: skip
        if arm not in ("dense", "dense_generate"):
            base = "dense_generate" if arm.endswith("_generate") else "dense"
            r = paired_speed_ratio(times[base], times[arm])
            row["vs_dense"], row["vs_dense_iqr"] = r["speed_ratio"], [r["speed_ratio_q1"], r["speed_ratio_q3"]]
            if base == "dense":  # the same forward as fused's: its logits must be fused's bit for bit
                row["logits_equal_fused"] = bool(torch.equal(logits[arm], logits["fused"]))
                row["max_dlogit_dense"] = (logits[arm].float() - logits["dense"].float()).abs().max().item()
            prof = cProfile.Profile()
            prof.enable()
            run(arm)
            torch.cuda.synchronize()
            prof.disable()
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(15)
            row["cprofile_top"] = s.getvalue().splitlines()[-22:]
        emit(row)


if __name__ == "__main__":
    main()
