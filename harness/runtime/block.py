"""The `block` cache policy: a transformer block's compressed layers decompressed together (DFloat11's design)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from harness.errors import HarnessError
from harness.runtime.policy import POLICIES, CachePolicy

if TYPE_CHECKING:
    from harness.runtime.compress import CompressedRuntime
    from harness.runtime.layer import CompressedLinear


def block_of(name: str) -> str:
    """The transformer block a layer belongs to: the module path up to its last numeric component
    ("model.layers.3.mlp.up_proj" -> "model.layers.3"); layers outside any block (lm_head) stand alone."""
    match = re.match(r"^(.*\.\d+)\.", name)
    return match.group(1) if match else name


@dataclass
class _Decoded:
    """One block's weights in one scratch slot; `ready` marks the end of a side-stream decode (CUDA)."""

    block: str
    slot: int
    weights: dict[int, torch.Tensor]
    ready: torch.cuda.Event | None = None


@POLICIES.register("block")
class PerBlock(CachePolicy):
    """DFloat11's design: at the first use of a block's compressed layer, decompress all of that block's
    compressed layers together (one batched call where the codec has one, e.g. nvcomp_ans with the bytes in
    VRAM) into a scratch buffer that every block reuses. A block's weights live until another block is entered
    or the pass ends: one decompression per layer per pass, one block of dense weights resident.

    `ahead=1` double-buffers: entering a block also decodes the next one (in the order of the previous pass)
    into the second buffer, on CUDA on a side stream that waits for the compute stream to leave that buffer and
    hands over with an event, so decoding overlaps compute. Like `prefetch`, the last pass decodes the next
    pass's first block for nothing: L*P + (layers of the first block) decompressions for P >= 2 passes."""

    name = "block"
    ALIGN_BYTES = 256

    def __init__(self, runtime: CompressedRuntime, ahead: int = 0) -> None:
        super().__init__(runtime)
        if ahead not in (0, 1):
            raise HarnessError(f"cache.ahead={ahead} is invalid; block decodes 0 or 1 block ahead")
        self.ahead = ahead
        linear = runtime.linear_layers
        self._block_of = {layer.index: block_of(layer.name) for layer in linear}  # not on the hot path
        self._blocks: dict[str, list[CompressedLinear]] = {}
        for layer in linear:
            self._blocks.setdefault(self._block_of[layer.index], []).append(layer)
        self._block_bytes = {block: sum(layer.weight_nbytes for layer in layers) for block, layers in self._blocks.items()}
        self._offsets: dict[int, int] = {}  # layer index -> byte offset in a scratch buffer
        self.scratch_bytes = 0
        for layers in self._blocks.values():
            offset = 0
            for layer in layers:
                self._offsets[layer.index] = offset
                offset += -(-layer.weight_nbytes // self.ALIGN_BYTES) * self.ALIGN_BYTES
            self.scratch_bytes = max(self.scratch_bytes, offset)
        self._scratch: list[torch.Tensor | None] = [None, None]
        self._views: dict[tuple[str, int], list[torch.Tensor]] = {}  # (block, slot) -> its weights' scratch views
        self._freed: list[torch.cuda.Event | None] = [None, None]  # compute stream done with the slot
        self._events: dict[tuple[str, int], torch.cuda.Event] = {}  # reused: creating one per block costs host time
        self._current: _Decoded | None = None
        self._pending: _Decoded | None = None  # decoded ahead
        self._order: list[str] = []
        self._previous_order: list[str] = []
        self._side: torch.cuda.Stream | None = None

    def acquire(self, layer, device):
        block = self._block_of[layer.index]
        if self._current is None or self._current.block != block:
            self._enter(block, device)
        return self._current.weights[layer.index]

    def _enter(self, block: str, device: torch.device) -> None:
        slot = self._leave(device)
        self._order.append(block)
        pending, self._pending = self._pending, None
        if pending is not None and pending.ready is not None:
            torch.cuda.current_stream(device).wait_event(pending.ready)  # also before overwriting its slot
        if pending is not None and pending.block == block:
            self._current = pending
        else:
            if pending is not None:  # mispredicted: its slot is reused now
                self._drop(pending)
            slot = (slot + 1) % 2 if self.ahead else 0
            self._current = _Decoded(block, slot, self._decode(block, slot, device))
        if self.ahead:
            self._decode_next(device)

    def _decode_next(self, device: torch.device) -> None:
        order = self._previous_order
        position = len(self._order)  # the next block's position in this pass
        if not order:
            return
        block = order[position % len(order)]  # past the end: the next pass's first block
        if block == self._current.block:
            return
        slot = 1 - self._current.slot
        if device.type != "cuda":
            self._pending = _Decoded(block, slot, self._decode(block, slot, device))
            return
        if self._side is None:
            self._side = torch.cuda.Stream(device)
        with torch.cuda.stream(self._side):
            if self._freed[slot] is not None:
                self._side.wait_event(self._freed[slot])  # the compute stream has left this buffer
            weights = self._decode(block, slot, device)
            ready = self._event("ready", slot)
            ready.record(self._side)
        self._pending = _Decoded(block, slot, weights, ready)

    def _decode(self, block: str, slot: int, device: torch.device) -> dict[int, torch.Tensor]:
        scratch = self._scratch[slot]
        if scratch is None or scratch.device != device:
            scratch = self._scratch[slot] = torch.empty(self.scratch_bytes, dtype=torch.uint8, device=device)
            self._views = {key: v for key, v in self._views.items() if key[1] != slot}
        layers = self._blocks[block]
        outs = self._views.get((block, slot))
        if outs is None:  # built once: slicing and viewing 7 tensors per block per pass is measurable host time
            outs = self._views[(block, slot)] = [
                scratch[self._offsets[layer.index] : self._offsets[layer.index] + layer.ct.original_nbytes]
                .view(layer.ct.torch_dtype).view(layer.ct.shape)
                for layer in layers
            ]
        weights = self.runtime.decompress_many(layers, device, outs, key=(block, slot, scratch.data_ptr()))
        return {layer.index: w for layer, w in zip(layers, weights, strict=True)}

    def _leave(self, device: torch.device | None) -> int:
        """Drop the current block; returns its slot. On CUDA, mark when the compute stream is done with it."""
        if self._current is None:
            return 1  # so that the first block decoded goes to slot 0
        slot = self._current.slot
        if device is not None and device.type == "cuda":
            # Re-recording a reused event is safe: the wait on its previous recording was enqueued before.
            freed = self._event("freed", slot)
            freed.record(torch.cuda.current_stream(device))
            self._freed[slot] = freed
        self._drop(self._current)
        self._current = None
        return slot

    def _event(self, kind: str, slot: int) -> torch.cuda.Event:
        event = self._events.get((kind, slot))
        if event is None:
            event = self._events[(kind, slot)] = torch.cuda.Event()
        return event

    def _drop(self, decoded: _Decoded) -> None:
        self.runtime.stats.unhold(self._block_bytes[decoded.block])  # the whole block at once

    def begin_pass(self):
        device = None if self._current is None else next(iter(self._current.weights.values())).device
        self._leave(device)
        if self._order:
            self._previous_order, self._order = self._order, []

    def clear(self):
        device = None if self._current is None else next(iter(self._current.weights.values())).device
        self._leave(device)
        if self._pending is not None:
            if self._pending.ready is not None:
                self._pending.ready.synchronize()
            self._drop(self._pending)
            self._pending = None
        self._order, self._previous_order = [], []

    def close(self):
        self.clear()
        self._scratch = [None, None]
        self._views = {}
