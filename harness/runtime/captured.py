"""Capturable cache policies, for `generate.compile=true`: decoding that torch.compile and CUDA graphs can take.
(Just past 300 lines: the three capturable policies and the two ops they share.)

The eager policies make per-call Python decisions (dicts, events, growing buffers) that a CUDA graph cannot
replay. Here each decode is one call of the opaque operator `codecllm::decode_group(x, counts, handle)`:
  - it returns a fresh buffer holding the group's dense weights (a transformer block's with `block`), which the
    group's layers read as views; the compiler allocates it (inside a CUDA graph, from the graph's pool, at a
    fixed address) and frees it after the group's last matmul, so one group of weights is alive at a time;
  - it only launches work on the current stream (the capture stream inside a capture): the codec prepared its
    tables once (`Codec.prepare_group`); no host waits, no tables are built;
  - it counts itself on the device (`counts[layers] += 1`, declared as a mutation), so counters stay exact under
    replay, when no Python runs; the host reads them once per generation.
`x` (the trigger layer's input) only orders the decode after what computes it. Which layer triggers a group's
decode is learned from the first pass, which transformers always runs eagerly (the prefill): compiled steps then
decode at fixed points, one decode per group per step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from harness.errors import HarnessError
from harness.runtime.block import block_of
from harness.runtime.policy import CAPTURED_POLICIES, CachePolicy

if TYPE_CHECKING:
    from harness.runtime.compress import CompressedRuntime
    from harness.runtime.layer import CompressedLinear

ALIGN_BYTES = 256


@dataclass
class _Group:
    decode: Callable[[torch.Tensor], None]  # into a flat uint8 buffer
    nbytes: int
    slots: torch.Tensor  # where in the flattened counts [2, layers] this group's decodes and bytes go (int64)
    amounts: torch.Tensor  # what to add there: 1 per layer, then each layer's bytes


@dataclass
class _Rows:
    lookup: Callable[[torch.Tensor], tuple[torch.Tensor, int]]  # ids -> (rows, bytes decoded)
    width: int
    dtype: torch.dtype
    index: int  # the table's runtime index: its decodes at counts[0, index], bytes at counts[1, index]


# handle -> prepared decode. A custom op takes tensors and scalars only, so the prepared decodes live in these
# tables and the ops name one by an integer (dynamo bakes the integer into the graph).
_GROUPS: list[_Group | None] = []
_ROWS: list[_Rows | None] = []


def _entry(table: list, handle: int, op: str):
    entry = table[handle]
    if entry is None:
        raise RuntimeError(f"codecllm::{op}: decode {handle} belongs to a closed runtime")
    return entry


@torch.library.custom_op("codecllm::decode_group", mutates_args=("counts",))
def decode_group(x: torch.Tensor, counts: torch.Tensor, handle: int) -> torch.Tensor:
    """Group `handle`'s dense weights in a new flat uint8 buffer; its decodes and bytes added to `counts`."""
    group = _entry(_GROUPS, handle, "decode_group")
    out = torch.empty(group.nbytes, dtype=torch.uint8, device=counts.device)
    group.decode(out)
    counts.view(-1).index_add_(0, group.slots, group.amounts)
    return out


@decode_group.register_fake
def _decode_group_fake(x: torch.Tensor, counts: torch.Tensor, handle: int) -> torch.Tensor:
    return counts.new_empty(_GROUPS[handle].nbytes, dtype=torch.uint8)


@torch.library.custom_op("codecllm::embed_rows", mutates_args=("counts",))
def embed_rows(ids: torch.Tensor, counts: torch.Tensor, handle: int) -> torch.Tensor:
    """The embedding rows of `ids` from table `handle`'s compressed bytes (only the chunks holding them, with a
    codec that can); one decode and its bytes added to `counts`."""
    rows = _entry(_ROWS, handle, "embed_rows")
    out, nbytes = rows.lookup(ids)
    counts[0, rows.index].add_(1)  # scalar adds: kernels with the value as an argument, so a graph replays them
    counts[1, rows.index].add_(nbytes)
    return out


@embed_rows.register_fake
def _embed_rows_fake(ids: torch.Tensor, counts: torch.Tensor, handle: int) -> torch.Tensor:
    rows = _ROWS[handle]
    return ids.new_empty((*ids.shape, rows.width), dtype=rows.dtype)


class _Captured(CachePolicy):
    """Groups of layers decoded together into one buffer; `group_of` says which."""

    capturable = True

    def __init__(self, runtime: CompressedRuntime) -> None:
        super().__init__(runtime)
        codec, device = runtime.codec, runtime.device
        if device.type == "cuda" and not codec.capturable:
            raise HarnessError(
                f"generate.compile=true on CUDA needs a capturable codec (nvcomp_ans_batched with "
                f"compress.placement=gpu), not {codec.name}"
            )
        groups: dict[str, list[CompressedLinear]] = {}
        for layer in runtime.linear_layers:
            groups.setdefault(self.group_of(layer), []).append(layer)
        self._groups = list(groups.values())
        self._group_index = {layer.index: g for g, members in enumerate(self._groups) for layer in members}
        self._slices: dict[int, tuple[int, int, torch.dtype, tuple[int, ...]]] = {}
        n = len(runtime.layers)
        self._counts = torch.zeros((2, n), dtype=torch.int64, device=device)  # [decodes, bytes] per layer
        # A static address: CUDA-graph trees must neither copy it in nor see its address change.
        torch._dynamo.mark_static_address(self._counts)
        self._handles: list[int] = []
        self.group_bytes = 0
        for members in self._groups:
            offsets, offset = [], 0
            for layer in members:
                self._slices[layer.index] = (offset, layer.weight_nbytes, layer.ct.torch_dtype, tuple(layer.ct.shape))
                offsets.append(offset)
                offset += -(-layer.weight_nbytes // ALIGN_BYTES) * ALIGN_BYTES
            self.group_bytes = max(self.group_bytes, offset)
            slots = [layer.index for layer in members] + [n + layer.index for layer in members]
            amounts = [1] * len(members) + [layer.weight_nbytes for layer in members]
            self._handles.append(len(_GROUPS))
            _GROUPS.append(_Group(codec.prepare_group([layer.ct for layer in members], offsets), offset,
                                  torch.tensor(slots, device=device), torch.tensor(amounts, device=device)))
        self._row_handles: dict[int, int] = {}
        for table in runtime.embedding_layers:
            self._row_handles[table.index] = len(_ROWS)
            _ROWS.append(_Rows(codec.prepare_rows(table.ct), table.embedding_dim, table.ct.torch_dtype, table.index))
        self._live: torch.Tensor | None = None  # the current group's buffer (traced: a value inside the graph)
        self._live_group: int | None = None
        self._triggers: frozenset[int] | None = None  # learned in the first pass
        self._last: int | None = None  # the first pass's last layer: it lets the buffer go
        self._first_uses: list[int] = []
        self._snapshots: list[torch.Tensor] = []  # counts at the start of each pass of this generation
        self._holding = False

    def group_of(self, layer: CompressedLinear) -> str:
        raise NotImplementedError

    def _view(self, buffer: torch.Tensor, layer: CompressedLinear) -> torch.Tensor:
        offset, nbytes, dtype, shape = self._slices[layer.index]
        return buffer[offset : offset + nbytes].view(dtype).view(shape)

    # -- the forward path ------------------------------------------------------------------------------------------
    def weight(self, layer: CompressedLinear, x: torch.Tensor) -> torch.Tensor:
        """The layer's dense weight, a view of its group's buffer. Traced: the group is decoded at its trigger
        layer. Eager: decoded when the group changes (and the first pass's order is checked)."""
        group = self._group_index[layer.index]
        if torch.compiler.is_compiling():
            if self._triggers is None:
                raise HarnessError("generate.compile=true: the compressed model must run one eager pass before it is compiled")
            if layer.index in self._triggers:
                self._live = torch.ops.codecllm.decode_group(x, self._counts, self._handles[group])
            w = self._view(self._live, layer)
            if layer.index == self._last:
                self._live = None  # nothing of the graph escapes through this attribute
            return w
        return self._view(self._eager(layer, group, x), layer)

    def _eager(self, layer: CompressedLinear, group: int, x: torch.Tensor) -> torch.Tensor:
        if self._triggers is None:
            self._first_uses.append(layer.index)
        if self._live_group == group:
            return self._live
        if self._triggers is not None and layer.index not in self._triggers:
            raise HarnessError(
                f"generate.compile=true: layer {layer.name} started its group's decode in this pass but not in the "
                "first one; the model runs its layers in an order that changes between passes"
            )
        self._live, self._live_group = None, None  # free the previous group's buffer first
        self._live = decode_group(x, self._counts, self._handles[group])  # the op, called directly
        self._live_group = group
        if not self._holding:
            self.runtime.stats.hold(self.group_bytes)
            self._holding = True
        members = self._groups[group]
        self.runtime.verify_group(members, [self._view(self._live, m) for m in members])
        return self._live

    def embed(self, table, ids: torch.Tensor) -> torch.Tensor:
        """An embedding lookup through the opaque op; eagerly, the first one decodes and verifies the whole
        table (runtime.embed, counted on the host) when verification asks for it."""
        if not torch.compiler.is_compiling() and self.runtime.needs_verify(table):
            return self.runtime.embed(table, ids)
        return torch.ops.codecllm.embed_rows(ids, self._counts, self._row_handles[table.index])

    # -- pass boundaries (Python, between graph replays) --------------------------------------------------------
    def begin_pass(self) -> None:
        if self._triggers is None and self._first_uses:
            self._triggers = self._learn(self._first_uses)
            self._last = self._first_uses[-1]
        self._live, self._live_group = None, None
        self._snapshots.append(self._counts.clone())

    def _learn(self, uses: list[int]) -> frozenset[int]:
        triggers, previous = set(), None
        for index in uses:
            group = self._group_index[index]
            if group != previous:
                triggers.add(index)
            previous = group
        return frozenset(triggers)

    def clear(self) -> None:
        """End of a generation: read the device counters once (one sync) into the phase's exact counts."""
        self._live, self._live_group = None, None
        if self._snapshots:
            marks = torch.stack([*self._snapshots, self._counts]).cpu()  # [passes + 1, 2, layers]
            per_pass = marks[1:] - marks[:-1]
            self.runtime.stats.add_passes(per_pass[:, 0].tolist(), per_pass[:, 1].tolist(), self.runtime.layers)
            self._snapshots = []
        if self._holding:
            self.runtime.stats.unhold(self.group_bytes)
            self._holding = False

    def close(self) -> None:
        self.clear()
        for handle in self._handles:
            _GROUPS[handle] = None
        for handle in self._row_handles.values():
            _ROWS[handle] = None
        self._handles, self._row_handles = [], {}


@CAPTURED_POLICIES.register("block")
class CapturedBlock(_Captured):
    """`cache=block` compiled: a transformer block's layers in one decode call, one block of scratch."""

    name = "block"

    def __init__(self, runtime: CompressedRuntime, ahead: int = 0) -> None:
        if ahead != 0:
            raise HarnessError("cache.ahead=1 has no compiled form (its side stream and events are per-call host "
                               "logic); use cache.ahead=0 with generate.compile=true")
        super().__init__(runtime)

    def group_of(self, layer):
        return block_of(layer.name)


class _CapturedPerLayer(_Captured):
    """Each layer decoded at its use into one layer-sized scratch buffer."""

    def group_of(self, layer):
        return layer.name


@CAPTURED_POLICIES.register("none")
class CapturedNone(_CapturedPerLayer):
    name = "none"


@CAPTURED_POLICIES.register("per_forward_pass")
class CapturedPerForwardPass(_CapturedPerLayer):
    """Per pass, each layer once: the same decodes as `none` when every layer runs once per pass (a decoder's
    linear layers do). A layer that runs twice in a pass would be decoded twice here but once eagerly, so it is
    refused rather than counted differently."""

    name = "per_forward_pass"

    def _learn(self, uses):
        seen = set()
        for index in uses:
            if index in seen:
                name = self.runtime.layers[index].name
                raise HarnessError(f"cache=per_forward_pass with generate.compile=true needs each layer once per pass; "
                                   f"{name} runs more than once: use cache=block or generate.compile=false")
            seen.add(index)
        return super()._learn(uses)


@torch.library.custom_op("codecllm::opaque_embedding", mutates_args=())
def opaque_embedding(ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.embedding(ids, weight)


@opaque_embedding.register_fake
def _opaque_embedding_fake(ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return weight.new_empty((*ids.shape, weight.shape[1]))


class OpaqueEmbedding(torch.nn.Module):
    """The exactness reference for a compiled model whose embedding table is compressed: the same dense lookup
    behind an opaque op, so Inductor fuses around it exactly as it fuses around `codecllm::embed_rows`.
    (Inductor fuses a plain `aten.embedding` into the next RMSNorm, and that kernel rounds differently, so a
    compressed lookup cannot be bit-identical to a plain dense one under torch.compile; against this it is.)"""

    def __init__(self, embedding: torch.nn.Embedding) -> None:
        super().__init__()
        self.weight = embedding.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.ops.codecllm.opaque_embedding(ids, self.weight)
