"""nn.Linear stand-ins that compute through the lut3 kernel, and a swap over a whole model.

    counts = swap_linears(model, mode="fused")       # every eligible nn.Linear -> FusedLinear (lut3 in VRAM)
    counts = swap_linears(model, mode="reference")   # the same kernel fed the uncompressed weights

A step of <= 8 tokens (a decode step) goes through the op `codecllm::lut3_linear`: no dense weight is written
anywhere. Longer inputs (the prefill) decode the weight with the kernel's decode and call F.linear. Both count on
the device: counts[0, i] += 1 per in-kernel use of layer i, counts[1, i] += 1 per decode to dense; under CUDA
graphs no Python runs, so the host reads the counts after a generation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from harness.fused import lut3, lut3_cuda


@torch.library.custom_op("codecllm::lut3_dense", mutates_args=("counts",))
def lut3_dense(
    signman: torch.Tensor, codes: torch.Tensor, esc_exp: torch.Tensor, esc_off: torch.Tensor, exponents: list[int],
    n: int, k: int, counts: torch.Tensor, slot: int,
) -> torch.Tensor:  # fmt: skip
    """The dense weight, decoded by the kernel's own decode (for inputs longer than MAX_TOKENS)."""
    p = lut3.Lut3((n, k), signman, codes, esc_exp, esc_off, tuple(exponents))
    counts.view(-1)[slot] += 1
    return lut3_cuda.decode_gpu(p)


@lut3_dense.register_fake
def _lut3_dense_fake(signman, codes, esc_exp, esc_off, exponents, n, k, counts, slot):
    return signman.new_empty((n, k), dtype=torch.bfloat16)


class FusedLinear(nn.Module):
    """y = x @ W.T + b with W held as lut3 (or, mode "reference", as the kernel's uncompressed inputs)."""

    def __init__(self, linear: nn.Linear, index: int, counts: torch.Tensor, mode: str = "fused") -> None:
        super().__init__()
        w = linear.weight.detach()
        self.in_features, self.out_features, self.mode, self.index = w.shape[1], w.shape[0], mode, index
        self.counts = counts
        self.bias = linear.bias
        p = lut3.encode(w)
        self.exponents = p.exponents
        if mode == "fused":
            self.register_buffer("signman", p.signman)
            self.register_buffer("codes", p.codes)
            self.register_buffer("esc_exp", p.esc_exp)
            self.register_buffer("esc_off", p.esc_off)
            self.lut = list(p.lut_words())
            self.nbytes = p.nbytes()
        else:
            ref = lut3_cuda.reference_inputs(w, p.exponents)
            self.register_buffer("ref_main", ref.main)
            self.register_buffer("ref_mask", ref.mask)
            self.register_buffer("ref_raw", ref.raw)
            self.register_buffer("weight_ref", w)
            self.nbytes = w.numel() * w.element_size()

    def weight_shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def packed(self) -> lut3.Lut3:
        return lut3.Lut3(self.weight_shape(), self.signman, self.codes, self.esc_exp, self.esc_off, self.exponents)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2d = x.reshape(-1, self.in_features)
        n, k = self.out_features, self.in_features
        if x2d.shape[0] <= lut3_cuda.MAX_TOKENS:
            x2d = x2d.contiguous()
            if self.mode == "fused":
                y = torch.ops.codecllm.lut3_linear(x2d, self.signman, self.codes, self.esc_exp, self.esc_off,
                                                   self.lut, n, self.counts, self.index)  # fmt: skip
            else:
                y = torch.ops.codecllm.lut3_reference_linear(x2d, self.ref_main, self.ref_mask, self.ref_raw, n,
                                                             self.counts, self.index)  # fmt: skip
            y = y.reshape(*lead, n)
            return y if self.bias is None else y + self.bias
        if self.mode == "fused":
            w = torch.ops.codecllm.lut3_dense(self.signman, self.codes, self.esc_exp, self.esc_off,
                                              list(self.exponents), n, k, self.counts,
                                              self.counts.shape[1] + self.index)  # fmt: skip
        else:
            w = self.weight_ref
        return F.linear(x, w, self.bias)


def swap_linears(
    model: nn.Module, mode: str = "fused", skip_tied: bool = True, tune_tokens: tuple[int, ...] = ()
) -> torch.Tensor:
    """Replace every nn.Linear that lut3 can hold (bf16, in_features % 64 == 0; a tied lm_head is skipped) by a
    FusedLinear; returns the device counts tensor [2, layers] the new modules add to. `tune_tokens`: time the
    kernel's warps per tile once per distinct weight shape at these token counts (lut3_cuda.tune)."""
    tied = set()
    if skip_tied and getattr(model.config, "tie_word_embeddings", False):
        tied.add(id(model.get_output_embeddings().weight))
    names = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    names = [
        (n_, m)
        for n_, m in names
        if id(m.weight) not in tied and lut3.supported(tuple(m.weight.shape), m.weight.dtype) is None
    ]
    device = next(model.parameters()).device
    counts = torch.zeros(2, len(names), dtype=torch.int64, device=device)
    tuned: set[tuple[int, int]] = set()
    for i, (name, linear) in enumerate(names):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        fl = FusedLinear(linear, i, counts, mode)
        setattr(parent, child, fl)
        if mode == "fused" and tune_tokens and fl.weight_shape() not in tuned:
            tuned.add(fl.weight_shape())
            for m in tune_tokens:
                lut3_cuda.tune(fl.packed(), m)
    return counts
