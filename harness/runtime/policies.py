"""The per-layer cache policies (none, per_forward_pass, full, lru, prefetch); the interface is in policy.py."""

from __future__ import annotations

from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch

from harness.errors import HarnessError
from harness.runtime.policy import POLICIES, CachePolicy

if TYPE_CHECKING:
    from harness.runtime.compress import CompressedRuntime
    from harness.runtime.layer import CompressedLinear

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
        self.check_budget(budget_mb, [(layer.name, layer.weight_nbytes) for layer in runtime.linear_layers])
        self.budget_bytes = int(budget_mb * 1e6)
        self._cached_bytes = 0

    @staticmethod
    def check_budget(budget_mb: float | None, layers: list[tuple[str, int]]) -> None:
        """The budget must be > 0 and hold the largest dense linear weight (name, bytes) it keeps (embeddings
        decode rows and are not kept). One rule for the constructor and for checks.check_loaded, which
        applies it to the selected layers before the baseline runs."""
        if budget_mb is None or budget_mb <= 0:
            raise HarnessError(f"cache.budget_mb={budget_mb} is invalid; the lru policy needs a budget > 0 (MB)")
        name, nbytes = max(layers, key=lambda layer: layer[1], default=(None, 0))
        if nbytes > budget_mb * 1e6:
            need_mb = nbytes / 1e6
            raise HarnessError(
                f"cache.budget_mb={budget_mb} is smaller than the largest compressed layer "
                f"({name}: {need_mb:.2f} MB); use cache.budget_mb>={need_mb:.2f}"
            )

    def _make_room(self, layer):
        while self._cache and self._cached_bytes + layer.weight_nbytes > self.budget_bytes:
            self._evict(next(iter(self._cache)))  # OrderedDict front = least recently used
        self._cached_bytes += layer.weight_nbytes

    def _evict(self, index):
        self._cached_bytes -= self.runtime.layers[index].weight_nbytes
        super()._evict(index)


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
        if not isinstance(workers, int) or workers < 1:
            raise HarnessError(f"cache.workers={workers!r} is invalid; prefetch needs workers >= 1")
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
