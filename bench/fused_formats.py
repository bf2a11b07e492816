"""CPU: bits/weight and escape rates of candidate fixed-length bf16 formats (numbers for docs/fused.md).

    python bench/fused_formats.py [--smollm2]

Candidates: lut3 (7 most frequent exponents through a table + inline escapes, the format the CUDA kernel reads;
exact nbytes from encode), exp3 (7-wide exponent window + escape, the Triton kernel's format, exact nbytes), top-7 table
(the 7 most frequent exponents, any values), exp4 (15-wide window + escape, 4-bit codes), and the entropy bound
8 + H(exponent) for sign+mantissa raw.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness.fused import lut3  # noqa: E402
from harness.fused.format import best_window, encode, exponent_histogram  # noqa: E402


def candidates(w: torch.Tensor) -> dict:
    hist = exponent_histogram(w).double()
    total = hist.sum()
    prob = hist[hist > 0] / total
    entropy = float(-(prob * prob.log2()).sum())
    top7 = float(hist.sort(descending=True).values[:7].sum() / total)
    b3, b4 = best_window(hist, 7), best_window(hist, 15)
    win3 = float(hist[b3 : b3 + 7].sum() / total)
    win4 = float(hist[b4 : b4 + 15].sum() / total)
    p = encode(w)
    q = lut3.encode(w)
    return {
        "lut3_bits": 8 * q.nbytes() / w.numel(),
        "lut3_ratio": 2 * w.numel() / q.nbytes(),
        "lut3_escape_rate": q.n_escapes / w.numel(),
        "exponent_entropy_bits": entropy,
        "exp3_escape_rate": 1 - win3,
        "exp3_bits": 8 * p.nbytes / w.numel(),
        "exp3_ratio": p.ratio,
        "top7_escape_rate": 1 - top7,
        "top7_bits_est": 11 + 8 * (1 - top7),  # + offsets, as exp3
        "exp4_escape_rate": 1 - win4,
        "exp4_bits_est": 12 + 8 * (1 - win4),
        "entropy_bound_bits": 8 + entropy,
    }


def show(name: str, r: dict) -> None:
    print(
        f"{name:28} H(exp) {r['exponent_entropy_bits']:.2f} | lut3 {r['lut3_bits']:.3f} b/w ({r['lut3_ratio']:.3f}x, "
        f"esc {100 * r['lut3_escape_rate']:.2f}%) | exp3 {r['exp3_bits']:.3f} b/w ({r['exp3_ratio']:.3f}x, "
        f"esc {100 * r['exp3_escape_rate']:.2f}%) | top7 esc {100 * r['top7_escape_rate']:.2f}% "
        f"{r['top7_bits_est']:.3f} b/w | exp4 esc {100 * r['exp4_escape_rate']:.3f}% {r['exp4_bits_est']:.3f} b/w "
        f"({16 / r['exp4_bits_est']:.3f}x) | bound {r['entropy_bound_bits']:.2f} b/w ({16 / r['entropy_bound_bits']:.3f}x)"
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smollm2", action="store_true", help="also the real SmolLM2-135M weights (harness.models)")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    for n, k in ((4096, 4096), (1024, 4096)):
        show(f"normal(0,0.02) {n}x{k}", candidates((torch.randn(n, k, generator=g) * 0.02).to(torch.bfloat16)))
    if args.smollm2:
        from omegaconf import OmegaConf

        from harness.models import load_model

        cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "model" / "smollm2_135m.yaml")
        model = load_model(cfg).model
        mats = {n: t for n, t in model.state_dict().items() if t.dim() == 2 and t.dtype == torch.bfloat16}
        nbytes = dense = lut_bytes = 0
        for t in mats.values():
            p = encode(t.contiguous())
            nbytes, dense = nbytes + p.nbytes, dense + 2 * t.numel()
            lut_bytes += lut3.encode(t.contiguous()).nbytes()
        for name in [n for n in mats if ".0." in n or "embed" in n]:
            show(name.removeprefix("model."), candidates(mats[name].contiguous()))
        print(
            f"SmolLM2-135M all {len(mats)} matrices: exp3 ratio {dense / nbytes:.3f}x ({8 * nbytes / (dense / 2):.3f} b/w), "
            f"lut3 ratio {dense / lut_bytes:.3f}x ({8 * lut_bytes / (dense / 2):.3f} b/w)"
        )


if __name__ == "__main__":
    main()
