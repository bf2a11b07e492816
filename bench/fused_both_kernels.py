"""Both kernels on the activations a compiled graph gives them, one GPU:

    python bench/fused_both_kernels.py --shape llama_8b --tokens 64 --out fused_both_kernels_8b.jsonl

Three compiled arms of one model (greedy, b=1, Inductor's default mode): cache=fused, its exactness reference, and a
check arm whose op runs the fused kernel AND the reference kernel on the same activations, returns the fused output
and records per layer, on the device (capturable), the first launch where the two differ and that launch's x.
Rows: the arms' logits against each other (first differing step), the layers whose kernels ever differed, and for
each of those both kernels re-run eagerly on the saved x (does the difference reproduce outside the graph?).
Written to tell a kernel difference from a compilation difference when the compiled fused run and its compiled
reference part (docs/fused.md, "The 8B exactness reference"). ~90 GB at 8B.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import types
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from bench_compile import first_step_differ, prompts  # noqa: E402
from fused_exactness import fused_arms, jsonl_emitter, synthetic  # noqa: E402

from harness.fused import lut3, lut3_cuda  # noqa: E402
from harness.generation import greedy_generate  # noqa: E402


@torch.library.custom_op("bench::lut3_both", mutates_args=("counts", "first", "xsave"))
def lut3_both(x2d: torch.Tensor, ptrs: list[int], lut: list[int], raw: list[int], n: int, iters: int,
              counts: torch.Tensor, slot: int, first: torch.Tensor, xsave: torch.Tensor, index: int) -> torch.Tensor:  # fmt: skip
    """The fused kernel's y; first[index] := the layer's launch count at the first launch where the reference kernel
    (fed W) gives other bits, and xsave[index] := that launch's x. Device ops only: a CUDA graph replays them."""
    flat = counts.view(-1)
    launch = flat[slot].clone()
    y = lut3_cuda._gemv_launch(lut3_cuda.fused_kernel(x2d.shape[0]), x2d, n, ptrs, lut, flat[slot:])
    m, tiles = x2d.shape[0], -(-n // lut3.TILE_ROWS)
    y_ref = torch.empty((m, n), dtype=torch.bfloat16, device=x2d.device)
    scratch = torch.zeros(1, dtype=torch.int64, device=x2d.device)
    lut3_cuda._launch(f"lut3_ref_m{lut3_cuda._template(m)}", tiles, lut3_cuda.warps_per_tile(tiles, iters, m),
                      [x2d, m, x2d.shape[1], *raw, y_ref, n, iters, scratch])  # fmt: skip
    new = (y.view(torch.int16) != y_ref.view(torch.int16)).any() & (first[index] < 0)
    first[index] = torch.where(new, launch, first[index])
    size = x2d.numel()
    xsave[index, :size] = torch.where(new, x2d.reshape(-1), xsave[index, :size])
    return y


@lut3_both.register_fake
def _lut3_both_fake(x2d, ptrs, lut, raw, n, iters, counts, slot, first, xsave, index):
    return x2d.new_empty((x2d.shape[0], n))


def check_arm(policy, device):
    """Point the policy's in-kernel path at lut3_both; the buffers it records into."""
    refs = {layer.index: lut3_cuda.reference_inputs(policy.runtime.codec.decode(layer.ct))
            for layer in policy.runtime.linear_layers}  # fmt: skip
    raw = {index: lut3_cuda.address(ref.raw) for index, ref in refs.items()}
    n_layers = len(policy.runtime.layers)
    width = max(layer.in_features for layer in policy.runtime.linear_layers) * lut3_cuda.MAX_TOKENS
    first = torch.full((n_layers,), -1, dtype=torch.int64, device=device)
    xsave = torch.zeros((n_layers, width), dtype=torch.bfloat16, device=device)
    torch._dynamo.mark_static_address(first)
    torch._dynamo.mark_static_address(xsave)

    def in_kernel(self, layer, x2d, n):
        return torch.ops.bench.lut3_both(x2d, self._ptrs[layer.index], self._lut[layer.index], raw[layer.index], n,
                                         refs[layer.index].iters, self._counts, self._slot[layer.index], first, xsave,
                                         layer.index)  # fmt: skip

    policy._in_kernel = types.MethodType(in_kernel, policy)
    return refs, first, xsave


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama_8b")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--out", default="fused_both_kernels.jsonl")
    args = ap.parse_args()
    emit, out = jsonl_emitter(args.out)
    torch._dynamo.config.cache_size_limit = 64
    dev = torch.device("cuda")
    dense = synthetic(args.shape, dev)
    tok = dense.tokenizer
    stack = contextlib.ExitStack()  # the reference arm stays inside reference() until the end
    arms = fused_arms(dense.model, (("fused_c", True, False), ("ref_c", True, True), ("check_c", True, False)), stack)
    del dense
    policy = arms["check_c"][2].policy
    refs, first, xsave = check_arm(policy, dev)
    res = {}
    for name, (model, _, rt) in arms.items():
        for _ in range(2):  # the second generation replays the graphs
            rt.reset_stats()
            first.fill_(-1)
            res[name] = greedy_generate(model, tok, prompts(1), args.tokens, args.tokens, device=dev, compile=True)
            rt.end_generation()
    for a, b in (("fused_c", "ref_c"), ("check_c", "fused_c"), ("check_c", "ref_c")):
        emit({"a": "model", "pair": f"{a}~{b}", "tokens": args.tokens,
              "first_step_differ": first_step_differ(res[a].logits, res[b].logits),
              "tokens_equal": res[a].new_token_ids == res[b].new_token_ids})  # fmt: skip
    names = {layer.index: layer.name for layer in policy.runtime.layers}
    differ = [(i, names[i], launch) for i, launch in enumerate(first.cpu().tolist()) if launch >= 0]
    emit({"a": "kernels", "layers_differ": len(differ), "first": differ[:20]})
    for i, name, launch in differ[:10]:  # outside the graph, on the saved x
        layer = next(layer for layer in policy.runtime.linear_layers if layer.index == i)
        x = xsave[i, : layer.in_features].view(1, -1).clone()
        y, y_ref = lut3_cuda.gemv(x, policy._packed[i]), lut3_cuda.reference_gemv(x, refs[i])
        emit({"a": "eager_on_saved_x", "layer": name, "launch": launch,
              "differ_n": int((y.view(torch.int16) != y_ref.view(torch.int16)).sum()),
              "x_absmax": float(x.float().abs().max()), "x_finite": bool(x.isfinite().all())})  # fmt: skip
    stack.close()
    out.close()


if __name__ == "__main__":
    main()
