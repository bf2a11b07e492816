"""Cache policies: when a compressed layer's dense weight is decompressed, and how long it is kept.

All policies share one small interface; they differ only where their behaviour differs:
    acquire(layer, device) -> weight     the layer's forward needs its dense weight now
    release(layer, weight)               the layer's forward is done with it
    begin_pass() / end_pass()            one top-level forward pass (one generation step) starts / ends
    clear()                              drop everything (end of a generation); waits for work in flight
Decompression itself (and its exact accounting) is the runtime's `decompress` / `drop`.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from harness.errors import HarnessError
from harness.registry import Registry

if TYPE_CHECKING:
    from harness.runtime.layer import CompressedLinear
    from harness.runtime.runtime import CompressedRuntime

POLICIES: Registry[type[CachePolicy]] = Registry("cache policy")


class CachePolicy:
    name: ClassVar[str]

    def __init__(self, runtime: CompressedRuntime) -> None:
        self.runtime = runtime

    def acquire(self, layer: CompressedLinear, device: torch.device) -> torch.Tensor:
        raise NotImplementedError

    def release(self, layer: CompressedLinear, weight: torch.Tensor) -> None:
        pass

    def begin_pass(self) -> None:
        pass

    def end_pass(self) -> None:
        pass

    def clear(self) -> None:
        pass

    def close(self) -> None:
        self.clear()


@POLICIES.register("none")
class NoCache(CachePolicy):
    """Decompress at every use; nothing outlives the layer's forward."""

    name = "none"

    def acquire(self, layer, device):
        return self.runtime.decompress(layer, device)

    def release(self, layer, weight):
        self.runtime.drop(layer)


class _Keeping(CachePolicy):
    """Shared by the policies that keep decompressed weights in a dict keyed by layer index."""

    def __init__(self, runtime: CompressedRuntime) -> None:
        super().__init__(runtime)
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()

    def acquire(self, layer, device):
        w = self._cache.get(layer.index)
        if w is None:
            self._make_room(layer)
            w = self._cache[layer.index] = self.runtime.decompress(layer, device)
        else:
            self._cache.move_to_end(layer.index)
        return w

    def _make_room(self, layer: CompressedLinear) -> None:
        pass

    def _evict(self, index: int) -> None:
        del self._cache[index]
        self.runtime.drop(self.runtime.layers[index])

    def clear(self):
        for index in list(self._cache):
            self._evict(index)


@POLICIES.register("per_forward_pass")
class PerForwardPass(_Keeping):
    """Decompress at the first use in a forward pass, reuse within it, drop all when the next pass starts."""

    name = "per_forward_pass"

    def begin_pass(self):
        self.clear()


@POLICIES.register("full")
class Full(_Keeping):
    """Keep every weight after its first use: the upper bound on memory, the lower bound on time."""

    name = "full"


@POLICIES.register("lru")
class LRU(_Keeping):
    """Keep decompressed weights within a byte budget, evicting the least recently used first."""

    name = "lru"

    def __init__(self, runtime: CompressedRuntime, budget_mb: float | None = None) -> None:
        super().__init__(runtime)
        if budget_mb is None or budget_mb <= 0:
            raise HarnessError(f"cache.budget_mb={budget_mb} is invalid; the lru policy needs a budget > 0 (MB)")
        self.budget_bytes = int(budget_mb * 1e6)
        largest = max(runtime.layers, key=lambda layer: layer.weight_nbytes, default=None)
        if largest is not None and largest.weight_nbytes > self.budget_bytes:
            need_mb = largest.weight_nbytes / 1e6
            raise HarnessError(
                f"cache.budget_mb={budget_mb} is smaller than the largest compressed layer "
                f"({largest.name}: {need_mb:.2f} MB); use cache.budget_mb>={need_mb:.2f}"
            )
        self._cached_bytes = 0

    def _make_room(self, layer):
        while self._cache and self._cached_bytes + layer.weight_nbytes > self.budget_bytes:
            self._evict(next(iter(self._cache)))  # OrderedDict front = least recently used
        self._cached_bytes += layer.weight_nbytes

    def _evict(self, index):
        self._cached_bytes -= self.runtime.layers[index].weight_nbytes
        super()._evict(index)


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
        self._blocks: dict[str, list[CompressedLinear]] = {}
        for layer in runtime.layers:
            self._blocks.setdefault(block_of(layer.name), []).append(layer)
        self._offsets: dict[int, int] = {}  # layer index -> byte offset in a scratch buffer
        self.scratch_bytes = 0
        for layers in self._blocks.values():
            offset = 0
            for layer in layers:
                self._offsets[layer.index] = offset
                offset += -(-layer.weight_nbytes // self.ALIGN_BYTES) * self.ALIGN_BYTES
            self.scratch_bytes = max(self.scratch_bytes, offset)
        self._scratch: list[torch.Tensor | None] = [None, None]
        self._freed: list[torch.cuda.Event | None] = [None, None]  # compute stream done with the slot
        self._current: _Decoded | None = None
        self._pending: _Decoded | None = None  # decoded ahead
        self._order: list[str] = []
        self._previous_order: list[str] = []
        self._side: torch.cuda.Stream | None = None

    def acquire(self, layer, device):
        block = block_of(layer.name)
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
            ready = torch.cuda.Event()
            ready.record(self._side)
        self._pending = _Decoded(block, slot, weights, ready)

    def _decode(self, block: str, slot: int, device: torch.device) -> dict[int, torch.Tensor]:
        scratch = self._scratch[slot]
        if scratch is None or scratch.device != device:
            scratch = self._scratch[slot] = torch.empty(self.scratch_bytes, dtype=torch.uint8, device=device)
        layers = self._blocks[block]
        outs = []
        for layer in layers:
            start, ct = self._offsets[layer.index], layer.ct
            outs.append(scratch[start : start + ct.original_nbytes].view(ct.torch_dtype).view(ct.shape))
        weights = self.runtime.decompress_many(layers, device, outs)
        return {layer.index: w for layer, w in zip(layers, weights, strict=True)}

    def _leave(self, device: torch.device | None) -> int:
        """Drop the current block; returns its slot. On CUDA, mark when the compute stream is done with it."""
        if self._current is None:
            return 1  # so that the first block decoded goes to slot 0
        slot = self._current.slot
        if device is not None and device.type == "cuda":
            freed = torch.cuda.Event()
            freed.record(torch.cuda.current_stream(device))
            self._freed[slot] = freed
        self._drop(self._current)
        self._current = None
        return slot

    def _drop(self, decoded: _Decoded) -> None:
        for index in decoded.weights:
            self.runtime.drop(self.runtime.layers[index])

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


@POLICIES.register("prefetch")
class Prefetch(CachePolicy):
    """While a layer runs, decompress the next `depth` layers (in the order seen in the previous pass) on a
    worker thread. Each weight is used once and dropped, as with `none`; the first pass has no order yet and
    decompresses synchronously. Prefetches run across the pass boundary (into the next step's first layers),
    so a generation of P >= 2 passes over L layers decompresses exactly L*P + depth times."""

    name = "prefetch"

    def __init__(self, runtime: CompressedRuntime, depth: int = 2, workers: int = 1) -> None:
        super().__init__(runtime)
        if depth < 1:
            raise HarnessError(f"cache.depth={depth} is invalid; prefetch needs depth >= 1")
        self.depth = depth
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="prefetch")
        self._pending: dict[int, Future] = {}
        self._previous_order: list[int] = []
        self._order: list[int] = []
        self._side: torch.cuda.Stream | None = None  # CUDA side stream of the worker

    def begin_pass(self):
        if self._order:
            self._previous_order = self._order
        self._order = []

    def acquire(self, layer, device):
        self._order.append(layer.index)
        future = self._pending.pop(layer.index, None)
        self._schedule_after(len(self._order) - 1, layer.index, device)  # first, so the worker stays busy
        if future is not None:
            weight, ready = future.result()
            if ready is not None:  # CUDA: the compute stream waits for the side stream's decode, no host sync
                stream = torch.cuda.current_stream(device)
                stream.wait_event(ready)
                weight.record_stream(stream)  # its memory is not reused before this stream is done with it
            return weight
        return self.runtime.decompress(layer, device)

    def _fetch(self, layer: CompressedLinear, device: torch.device) -> tuple[torch.Tensor, Any]:
        """Worker thread: decompress; on CUDA on a side stream, returning the event that marks it done."""
        if device.type != "cuda":
            return self.runtime.decompress(layer, device), None
        if self._side is None:
            self._side = torch.cuda.Stream(device)
        with torch.cuda.device(device), torch.cuda.stream(self._side):
            weight = self.runtime.decompress(layer, device)
            ready = torch.cuda.Event()
            ready.record(self._side)
        # Throttle: the worker's future completes only when the decode has, so the host cannot queue more than
        # `depth` decoded weights ahead of the GPU (unthrottled, an 8B model's peak VRAM grew past baseline).
        ready.synchronize()
        return weight, ready

    def _schedule_after(self, position: int, current: int, device: torch.device) -> None:
        order = self._previous_order
        if not order:
            return
        for j in range(position + 1, position + 1 + self.depth):
            index = order[j % len(order)]  # past the end: the next pass's first layers
            if index == current or index in self._pending:
                continue
            layer = self.runtime.layers[index]
            self._pending[index] = self._pool.submit(self._fetch, layer, device)

    def release(self, layer, weight):
        self.runtime.drop(layer)

    def clear(self):
        # Wait rather than cancel: every decompression that was started is counted, so counts stay exact.
        pending, self._pending = self._pending, {}
        self._previous_order, self._order = [], []
        error = None
        for index, future in pending.items():
            try:
                future.result()
            except Exception as e:  # a failed decompression holds nothing; report the first failure
                error = error or e
            else:
                self.runtime.drop(self.runtime.layers[index])
        if error is not None:
            raise error

    def close(self):
        self.clear()
        self._pool.shutdown(wait=True)


def make_policy(name: str, runtime: CompressedRuntime, **options: Any) -> CachePolicy:
    cls = POLICIES.get(name)
    try:
        return cls(runtime, **options)
    except TypeError as e:  # an option this policy does not take
        raise HarnessError(f"cache={name}: {e}") from None
