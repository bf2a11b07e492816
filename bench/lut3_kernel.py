"""GPU benchmark of the lut3 fused decode + tensor-core GEMV against cuBLAS (F.linear) and its own exactness reference.

    python bench/lut3_kernel.py --out $OUT/lut3.jsonl [--only 8b.q_o,8b.gate_up] [--ms 1,8,24] [--budget-s 240]

For the Llama-3.1-8B and -3.2-1B linear shapes (random normal(0, 0.02) bf16) at M tokens (up to 32; past 8 only the
wide build, which a short prompt's prefill takes with cache.prefill_tokens): encode time and ratio,
GPU decode bit-exactness (the kernel's own decode), fused == reference (torch.equal), error against float64 and
against cuBLAS, then times. Timing: every variant's calls captured in one CUDA graph cycling over enough weight
copies that the 60 MB L2 cannot hold them (as in a graph-captured decode step), median of replays timed with CUDA
events. GB/s counts the bytes each variant must read (compressed bytes for fused; bf16 for cuBLAS). One JSON line
per (matrix, M), written as measured; a table and the per-token estimate last.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_timing import LLAMA_LINEARS, copy_bandwidth, graph_time_us  # noqa: E402

from harness.fused import lut3, lut3_cuda  # noqa: E402

SHAPES = {
    **LLAMA_LINEARS,
    # escape-dense (exponents spread over ~20 values, most weights escape): exercises the kernel's fallback path
    "stress.wide": (4096, 4096, 0),
}


def weight(name: str, n: int, k: int) -> torch.Tensor:
    w = torch.randn(n, k, device="cuda") * 0.02
    if name.startswith("stress"):
        w = w * torch.exp2(torch.randint(-10, 10, (n, k), device="cuda").float())
    return w.to(torch.bfloat16)


ROTATE_BYTES = 300e6  # > 4x the L2 per variant


def graph_time_s(fns: list) -> float:
    return graph_time_us(fns, min_launches=20) / 1e6


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def bench_matrix(name: str, n: int, k: int, ms: list[int], warps_list: list[int]) -> list[dict]:
    torch.manual_seed(zlib.crc32(name.encode()))
    w = weight(name, n, k)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    p = lut3.encode(w)
    torch.cuda.synchronize()
    enc_s = time.perf_counter() - t0
    dense_bytes, comp_bytes = n * k * 2, p.nbytes()
    torch_decode_exact = bool(torch.equal(lut3.decode(p).view(torch.int16), w.view(torch.int16)))
    ref = lut3_cuda.reference_inputs(w)
    copies = max(2, int(ROTATE_BYTES // comp_bytes) + 1)
    packs = [p] + [lut3.encode((torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)) for _ in range(copies - 1)]
    dense = [w] + [
        (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
        for _ in range(max(2, int(ROTATE_BYTES // dense_bytes) + 1) - 1)
    ]
    # the decode kernel (decompress-then-matmul's first half: a long prefill), timed into preallocated outputs
    outs = [torch.empty(n, k, dtype=torch.bfloat16, device="cuda") for _ in range(2)]
    decode_exact = bool(torch.equal(lut3_cuda.decode_gpu(p).view(torch.int16), w.view(torch.int16)))
    t = graph_time_s([(lambda q=q, o=o: lut3_cuda.decode_gpu(q, out=o)) for q, o in zip(packs, outs * len(packs))])
    decode = {"us": t * 1e6, "exact": decode_exact, "gbps": (comp_bytes + dense_bytes) / t / 1e9}
    del outs
    rows = []
    for m in ms:
        x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
        y_ref = lut3_cuda.reference_gemv(x, ref)
        y_blas = F.linear(x, w)
        y64 = x.double() @ w.double().T
        row = {"matrix": name, "N": n, "K": k, "M": m, "encode_s": enc_s, "ratio": dense_bytes / comp_bytes,
               "escape_rate": p.n_escapes / (n * k), "decode_gpu_exact": decode_exact,
               "decode_torch_exact": torch_decode_exact, "copies": copies, "decode": decode,
               "configs": []}  # fmt: skip
        per_kernel = {}  # kernel -> its fastest config
        refs_w = {wp: lut3_cuda.reference_gemv(x, ref, warps=wp) for wp in warps_list if wp <= p.iters}
        # past 8 tokens only the wide builds exist (lane's and ballot's): a short prefill in one launch
        for kern in lut3_cuda.FUSED_KERNELS if m <= lut3_cuda.MAX_TOKENS else ("lut3_gemv", "lut3_gemvb"):
            for wp, y_ref_w in refs_w.items():
                y = lut3_cuda.gemv(x, p, warps=wp, kernel=kern)
                exact = bool(torch.equal(y, y_ref_w))
                t = graph_time_s([(lambda q=q, wp=wp, x=x, kern=kern: lut3_cuda.gemv(x, q, warps=wp, kernel=kern))
                                  for q in packs])  # fmt: skip
                cfg = {"kernel": kern, "warps": wp, "us": t * 1e6, "gbps_compressed": comp_bytes / t / 1e9,
                       "fused_eq_reference": exact, "rel_err_fp64": rel(y.float(), y64)}  # fmt: skip
                row["configs"].append(cfg)
                if kern not in per_kernel or cfg["us"] < per_kernel[kern]["us"]:
                    per_kernel[kern] = cfg
        best = min(per_kernel.values(), key=lambda c: c["us"])
        row["per_kernel_us"] = {kern: c["us"] for kern, c in per_kernel.items()}
        if m == 1:  # where the time goes: the same kernel with the escapes left undecoded (wrong on purpose)
            row["diag1_us"] = 1e6 * graph_time_s(
                [(lambda q=q, wp=best["warps"], x=x: lut3_cuda.gemv(x, q, warps=wp, kernel="lut3_diag1")) for q in packs]
            )
        if lut3_cuda.pdl_supported(x.device):
            # the default build and warps back to back as the model runs them, plain and with programmatic
            # dependent launch (cache.pdl): there a launch may start while the one before it finishes
            for key, pdl in (("default_us", False), ("default_pdl_us", True)):
                row[key] = 1e6 * graph_time_s([(lambda q=q, x=x, pdl=pdl: lut3_cuda.gemv(x, q, pdl=pdl)) for q in packs])
            row["default_pdl_eq_plain"] = bool(torch.equal(lut3_cuda.gemv(x, p, pdl=True), lut3_cuda.gemv(x, p)))
            row["default_pdl_gbps_compressed"] = comp_bytes / (row["default_pdl_us"] / 1e6) / 1e9
        refs = [lut3_cuda.reference_inputs(d) for d in dense[:2]]
        t_ref = graph_time_s(
            [(lambda r=r, x=x, wp=best["warps"]: lut3_cuda.reference_gemv(x, r, warps=wp)) for r in refs * 2]
        )
        t_blas = graph_time_s([(lambda d=d, x=x: F.linear(x, d)) for d in dense])
        row.update(
            best_kernel=best["kernel"], best_warps=best["warps"], fused_us=best["us"], reference_us=t_ref * 1e6, cublas_us=t_blas * 1e6,
            fused_gbps_compressed=comp_bytes / (best["us"] / 1e6) / 1e9, cublas_gbps=dense_bytes / t_blas / 1e9,
            speedup_vs_cublas=t_blas / (best["us"] / 1e6), fused_eq_reference=best["fused_eq_reference"],
            reference_eq_across_configs=all(c["fused_eq_reference"] for c in row["configs"]),
            rel_err_fp64=best["rel_err_fp64"], rel_err_cublas_fp64=rel(y_blas.float(), y64),
            rel_fused_vs_cublas=rel(lut3_cuda.gemv(x, p).float(), y_blas.float()),
            reference_eq_fused_default=bool(torch.equal(lut3_cuda.gemv(x, p), y_ref)),
        )  # fmt: skip
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--only", default="")
    ap.add_argument("--ms", default="1,8")
    ap.add_argument("--warps", default="1,2,4,8,16")
    ap.add_argument("--budget-s", type=float, default=240)
    args = ap.parse_args()
    import machine

    start = time.perf_counter()
    info = machine.describe()
    print(machine.line(info), flush=True)
    kernels = lut3_cuda.kernels()
    res = {n: lut3_cuda.kernel_resources(n) for n in kernels}
    bw = copy_bandwidth()
    head = {"machine": info, "kernel_resources": res, "copy_gbps": bw, "compile_s": time.perf_counter() - start}
    print(json.dumps({k: v for k, v in head.items() if k != "machine"}), flush=True)
    with args.out.open("w") as f:
        f.write(json.dumps(head) + "\n")
    names = [s for s in args.only.split(",") if s] or list(SHAPES)
    ms = [int(v) for v in args.ms.split(",")]
    warps = [int(v) for v in args.warps.split(",")]
    rows = []
    for name in names:
        if time.perf_counter() - start > args.budget_s:
            print(f"budget spent: skipping {name}", flush=True)
            continue
        n, k, _ = SHAPES[name]
        try:
            got = bench_matrix(name, n, k, ms, warps)
        except Exception as e:  # keep going: the other matrices still tell something
            import traceback

            got = [{"matrix": name, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}]
        for r in got:
            rows.append(r)
            with args.out.open("a") as f:
                f.write(json.dumps(r) + "\n")
            short = {
                k2: (round(v, 4) if isinstance(v, float) else v)
                for k2, v in r.items()
                if k2 not in ("configs", "traceback")
            }
            print(json.dumps(short), flush=True)
        torch.cuda.empty_cache()
    print(f"\ncopy bandwidth {bw:.0f} GB/s (read + write)")
    builds = " | ".join(f"{kern[5:]} us" for kern in lut3_cuda.FUSED_KERNELS)
    print(
        f"| matrix | M | ratio | esc | fused us | {builds} | escapes undecoded us | reference us | cuBLAS us "
        "| x cuBLAS | fused GB/s (compr.) | % copy BW | kernel, warps | ==ref | dec exact |"
    )
    print("|---" * (14 + len(lut3_cuda.FUSED_KERNELS)) + "|")
    for r in rows:
        if "error" in r:
            print(f"| {r['matrix']} | error: {r['error'][:80]} |")
            continue
        d1 = r.get("diag1_us")
        pk = r["per_kernel_us"]
        per = " | ".join(f"{pk.get(kern, 0):.1f}" for kern in lut3_cuda.FUSED_KERNELS)
        print(f"| {r['matrix']} | {r['M']} | {r['ratio']:.3f} | {r['escape_rate']:.4f} | {r['fused_us']:.1f} | "
              f"{per} | {d1 and round(d1, 1)} | {r['reference_us']:.1f} | {r['cublas_us']:.1f} | {r['speedup_vs_cublas']:.2f} | {r['fused_gbps_compressed']:.0f} | "
              f"{100 * r['fused_gbps_compressed'] / bw:.0f} | {r['best_kernel'][5:]}, {r['best_warps']} | {r['fused_eq_reference']} | "
              f"{r['decode_gpu_exact']} |")  # fmt: skip
    print("\n| matrix | decode us | GB/s (read + write) | exact |\n|---|---|---|---|")
    for r in rows:
        if "error" not in r and r["M"] == ms[0]:
            d = r["decode"]
            print(f"| {r['matrix']} | {d['us']:.1f} | {d['gbps']:.0f} | {d['exact']} |")
    for m in ms:
        for model in ("8b", "1b"):
            sel = [r for r in rows if "error" not in r and r["M"] == m and r["matrix"].startswith(model + ".")]
            if sel:
                b_us = sum(r["cublas_us"] * SHAPES[r["matrix"]][2] for r in sel)
                for kern in sel[0]["per_kernel_us"]:
                    f_us = sum(r["per_kernel_us"][kern] * SHAPES[r["matrix"]][2] for r in sel)
                    print(
                        f"{model} M={m}: matmuls per token ({len(sel)} shapes) {kern} {f_us / 1e3:.2f} ms, "
                        f"cuBLAS {b_us / 1e3:.2f} ms, x{b_us / f_us:.2f}"
                    )


if __name__ == "__main__":
    main()
