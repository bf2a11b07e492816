"""Where a fused run and its exactness reference part, one GPU: each check isolates one part.

    python bench/fused_exactness.py --shape llama_8b --tokens 16 --out fused_exactness_8b.jsonl

  kernel  every Llama-8B matrix shape, random normal(0, 0.02) bf16, M = 1, 2, 3, 6, 8 tokens: every fused build
          (lut3_cuda.FUSED_KERNELS) against the reference kernel at the default warps per tile (differing output
          elements), and the decode kernel against W;
  layers  every layer of the model through the policy (Fused.linear) at 1, 8 and 24 tokens, fused against
          reference(), and the reference's own W against the kernel's decode;
  model   whole generations (greedy, --tokens), fused and reference, eager and compiled, b=1 and 8: the first
          step whose logits differ and the largest difference there; each arm against itself run again (is a
          generation deterministic?); and the same runtime in and out of reference(), as harness.exactness runs it.
--stress N relaunches every kernel case N times on the same inputs and counts launches that differ (a race).
Rows go to --out as JSON lines as they are measured. The 8B run needs ~90 GB (four models, the reference's W).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from bench_compile import first_step_differ, prompts  # noqa: E402

from harness.codecs import make_codec  # noqa: E402
from harness.fused import lut3, lut3_cuda  # noqa: E402
from harness.generation import greedy_generate  # noqa: E402
from harness.models import load_model  # noqa: E402
from harness.runtime import compress_model  # noqa: E402
from harness.selection import select_layers  # noqa: E402

MATRICES_8B = ((4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336), (128256, 4096))


def kernel_rows(emit, dev, stress: int = 0) -> None:
    g = torch.Generator(device=dev).manual_seed(0)
    for n, k in MATRICES_8B:
        w = (torch.randn(n, k, device=dev, generator=g) * 0.02).to(torch.bfloat16)
        p, ref = lut3.encode(w), lut3_cuda.reference_inputs(w)
        exact = torch.equal(lut3_cuda.decode_gpu(p).view(torch.int16), w.view(torch.int16))
        for m in (1, 2, 3, 6, 8):
            x = torch.randn(m, k, device=dev, generator=g).to(torch.bfloat16)
            want = lut3_cuda.reference_gemv(x, ref).view(torch.int16)
            row = {"a": "kernel", "n": n, "k": k, "m": m, "decode_exact": exact,
                   "warps": lut3_cuda.warps_per_tile(p.tiles, p.iters, m)}  # fmt: skip
            for kernel in lut3_cuda.FUSED_KERNELS:
                row[kernel] = int((lut3_cuda.gemv(x, p, kernel=kernel).view(torch.int16) != want).sum())
            if stress:  # a race would show as a launch that differs from the first on the same inputs
                row["stress_launches"] = stress
                row["stress_fused_differ"] = sum(
                    not torch.equal(lut3_cuda.gemv(x, p).view(torch.int16), want) for _ in range(stress)
                )
                row["stress_ref_differ"] = sum(
                    not torch.equal(lut3_cuda.reference_gemv(x, ref).view(torch.int16), want) for _ in range(stress)
                )
            emit(row)
        del w, p, ref


def jsonl_emitter(path: str):
    """emit(row): one JSON line appended to `path` (flushed: rows survive a killed run) and printed; and the file."""
    out = open(path, "a")

    def emit(row: dict) -> None:
        out.write(json.dumps(row) + "\n")
        out.flush()
        print(json.dumps(row), flush=True)

    return emit, out


def synthetic(shape: str, device):
    return load_model({"kind": "synthetic", "name": shape, "shape": shape, "seed": 0, "dtype": "bfloat16"}, device)


def fused_arms(dense_model, specs, stack: contextlib.ExitStack) -> dict:
    """name -> (model, compiled, runtime): a cache=fused copy of `dense_model` per (name, compiled, reference), the
    lut3 bytes encoded once and shared; a reference arm enters its policy's reference() on `stack`."""
    arms, encoded = {}, {}
    for name, compile_, reference in specs:
        model = copy.deepcopy(dense_model)
        rt = compress_model(model, make_codec("fused_lut3"), selection=select_layers(model, "all"), policy="fused",
                            placement="gpu", precompressed=encoded or None, captured=compile_, attach=True,
                            progress=False)  # fmt: skip
        encoded.update({layer.name: layer.ct for layer in rt.layers})
        if reference:
            stack.enter_context(rt.policy.reference())
        arms[name] = (model, compile_, rt)
    return arms


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama_8b")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--skip-kernel", action="store_true")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--inductor-default", action="store_true",
                    help="compile in Inductor's default mode (reduction configurations timed on the device), not "
                         "its deterministic mode as the harness does: the two compiled arms may then part by "
                         "Inductor's choices")  # fmt: skip
    ap.add_argument("--stress", type=int, default=0, help="kernel: relaunch each case this many times (a race?)")
    ap.add_argument("--out", default="fused_exactness.jsonl")
    args = ap.parse_args()
    emit, out = jsonl_emitter(args.out)
    torch._dynamo.config.cache_size_limit = 64
    dev = torch.device("cuda")
    if not args.skip_kernel:
        kernel_rows(emit, dev, args.stress)
    dense = synthetic(args.shape, dev)
    tok = dense.tokenizer
    stack = contextlib.ExitStack()  # the reference arms stay inside reference() until the end
    arms = fused_arms(dense.model, (("fused_e", False, False), ("ref_e", False, True), ("fused_c", True, False),
                                    ("ref_c", True, True)), stack)  # fmt: skip
    del dense
    fused, ref = arms["fused_e"][2], arms["ref_e"][2]
    g = torch.Generator(device=dev).manual_seed(0)
    w_differ, differ = 0, {}
    for layer, rlayer in zip(fused.linear_layers, ref.linear_layers, strict=True):
        w = ref.policy._reference_weight(rlayer)
        w_differ += not torch.equal(
            w.view(torch.int16), lut3_cuda.decode_gpu(fused.policy._packed[layer.index]).view(torch.int16)
        )
        for m in (1, 8, 24):
            x = torch.randn(m, layer.in_features, device=dev, generator=g).to(torch.bfloat16)
            if not torch.equal(fused.policy.linear(layer, x), ref.policy.linear(rlayer, x)):
                differ.setdefault(m, []).append(layer.name)
    emit(
        {
            "a": "layers",
            "ref_weight_differs": w_differ,
            "linear_differs": {m: (len(v), v[:4]) for m, v in differ.items()},
        }
    )
    for batch in args.batch:
        ps, res = prompts(batch), {}
        for name, (model, compile_, rt) in arms.items():
            gens = []
            for _ in range(3 if compile_ else 2):  # compiled: from the second generation on, graphs replay
                rt.reset_stats()
                gens.append(greedy_generate(model, tok, ps, args.tokens, args.tokens, device=dev, compile=compile_,
                                            deterministic=not args.inductor_default))  # fmt: skip
                rt.end_generation()
            res[name], res[f"{name}_again"] = gens[-2:]  # the same arm once more: is the run itself deterministic?
        for a, b in (("fused_e", "ref_e"), ("fused_c", "ref_c"), ("fused_c", "fused_e"), ("ref_c", "ref_e"),
                     *((n, f"{n}_again") for n in arms)):  # fmt: skip
            first = first_step_differ(res[a].logits, res[b].logits)
            at = (
                0.0
                if first is None
                else (res[a].logits[first].float() - res[b].logits[first].float()).abs().max().item()
            )
            emit({"a": "model", "shape": args.shape, "batch": batch, "tokens": args.tokens, "pair": f"{a}~{b}",
                  "tokens_equal": res[a].new_token_ids == res[b].new_token_ids, "first_step_differ": first,
                  "max_at_first": at})  # fmt: skip
        model, _, rt = arms["fused_e"]
        with rt.policy.reference():
            again = greedy_generate(model, tok, ps, args.tokens, args.tokens, device=dev)
        emit(
            {
                "a": "same_runtime_eager",
                "batch": batch,
                "logits_equal": bool(torch.equal(again.logits, res["fused_e"].logits)),
            }
        )
    stack.close()
    out.close()


if __name__ == "__main__":
    main()
