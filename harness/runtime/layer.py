"""The compressed linear layer: a module swap in the shape of gpt-fast's WeightOnlyInt8Linear.

The dense weight is gone; `forward` asks the runtime's cache policy for it and runs the ordinary op.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from harness.codecs.base import CompressedTensor

if TYPE_CHECKING:
    from harness.runtime.compress import CompressedRuntime


class CompressedLinear(nn.Module):
    """Stands in for nn.Linear (weight [out, in]) or GPT-2's Conv1D (weight [in, out], `transposed`)."""

    def __init__(
        self, name: str, ct: CompressedTensor, bias: nn.Parameter | None, runtime: CompressedRuntime, transposed: bool
    ) -> None:
        super().__init__()
        self.name = name
        self.ct = ct  # a plain attribute, not a buffer: .to(device) must not move the compressed bytes
        self.bias = bias
        self.transposed = transposed
        self.index = -1  # position among the runtime's layers, set by the runtime
        # object.__setattr__: the runtime is not a submodule (it must not appear in state_dict / named_modules)
        object.__setattr__(self, "runtime", runtime)
        if transposed:
            self.in_features, self.out_features = ct.shape
            self.nf = self.out_features
        else:
            self.out_features, self.in_features = ct.shape

    @property
    def weight_nbytes(self) -> int:
        return self.ct.original_nbytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        policy = self.runtime.policy
        if policy.computes_linear:  # the policy's kernel multiplies with the compressed weight (cache=fused)
            return policy.linear(self, x)
        if policy.capturable:  # traceable: a view of the policy's scratch, decoded by an opaque op
            return self._apply(x, policy.weight(self, x))
        w = policy.acquire(self, x.device)
        try:
            return self._apply(x, w)
        finally:
            policy.release(self, w)

    def _apply(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.transposed:  # exactly transformers' Conv1D.forward, so outputs stay bit-identical
            size_out = x.size()[:-1] + (self.nf,)
            return torch.addmm(self.bias, x.view(-1, x.size(-1)), w).view(size_out)
        return F.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        return (
            f"name={self.name}, in_features={self.in_features}, out_features={self.out_features}, "
            f"codec={self.ct.codec}, ratio={self.ct.ratio:.3f}"
        )
