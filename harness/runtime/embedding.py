"""The compressed embedding table: a lookup decodes only what it needs, outside the cache policy.

An embedding is read once per forward pass, at its start, for a handful of rows (one per new token). With a
codec that can decode rows (`decode_rows`: nvcomp_ans_batched, whose chunks hold whole rows) only the chunks
holding the looked-up rows are decoded; with any other codec the whole table is decoded, indexed and dropped.
Either way it is one counted decompression per lookup, and the cache policies never see it (they schedule the
linear layers of the blocks).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from harness.codecs.base import CompressedTensor

if TYPE_CHECKING:
    from harness.runtime.compress import CompressedRuntime


class CompressedEmbedding(nn.Module):
    """Stands in for nn.Embedding (weight [num_embeddings, embedding_dim]); lookups only (no max_norm)."""

    def __init__(self, name: str, ct: CompressedTensor, padding_idx: int | None, runtime: CompressedRuntime) -> None:
        super().__init__()
        self.name = name
        self.ct = ct
        self.num_embeddings, self.embedding_dim = ct.shape
        self.padding_idx = padding_idx
        self.index = -1
        object.__setattr__(self, "runtime", runtime)

    @property
    def weight_nbytes(self) -> int:
        return self.ct.original_nbytes

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        policy = self.runtime.policy
        if policy is not None and policy.capturable:  # traceable: the lookup is one opaque op
            return policy.embed(self, input)
        return self._lookup(input)

    # Never traced: the eager runtime's lookup is host logic; under torch.compile it runs between graphs.
    @torch.compiler.disable
    def _lookup(self, input: torch.Tensor) -> torch.Tensor:
        return self.runtime.embed(self, input)

    def extra_repr(self) -> str:
        return (f"name={self.name}, num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, "
                f"codec={self.ct.codec}, ratio={self.ct.ratio:.3f}")
