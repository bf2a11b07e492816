"""The cache-policy interface and its registry: when a compressed layer's dense weight is decoded, how long it is kept.

All policies share one small interface; they differ only where their behaviour differs:
    acquire(layer, device) -> weight     the layer's forward needs its dense weight now
    release(layer, weight)               the layer's forward is done with it
    begin_pass() / end_pass()            one top-level forward pass (one generation step) starts / ends
    clear()                              drop everything (end of a generation); waits for work in flight
Decompression itself (and its exact accounting) is the runtime's `decompress` / `drop`.

A `capturable` policy (captured.py, for generate.compile=true) replaces acquire/release with `weight(layer, x)`,
built only from operations that torch.compile can trace and a CUDA graph can replay.

A policy that `computes_linear` (fused.py) replaces the whole layer: `linear(layer, x)` returns its output, from
a kernel that multiplies with the compressed weight itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch

from harness.errors import HarnessError
from harness.registry import Registry

if TYPE_CHECKING:
    from harness.runtime.compress import CompressedRuntime
    from harness.runtime.layer import CompressedLinear

POLICIES: Registry[type[CachePolicy]] = Registry("cache policy")


class CachePolicy:
    name: ClassVar[str]
    capturable: ClassVar[bool] = False
    computes_linear: ClassVar[bool] = False

    def __init__(self, runtime: CompressedRuntime) -> None:
        self.runtime = runtime

    def acquire(self, layer: CompressedLinear, device: torch.device) -> torch.Tensor:
        raise NotImplementedError

    def release(self, layer: CompressedLinear, weight: torch.Tensor) -> None:
        pass

    def linear(self, layer: CompressedLinear, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def begin_pass(self) -> None:
        pass

    def end_pass(self) -> None:
        pass

    def clear(self) -> None:
        pass

    def close(self) -> None:
        self.clear()


CAPTURED_POLICIES: Registry[type[CachePolicy]] = Registry("cache policy under generate.compile=true")


def make_policy(runtime: CompressedRuntime, name: str, captured: bool = False, **options: Any) -> CachePolicy:
    """The policy `name` built for `runtime`; `captured` picks its capturable variant (generate.compile=true).
    conf/cache/*.yaml target this as a partial (runtime first, so a partial of name and options can be called with
    it): the name, not a class, because the captured variant is another class of the same name."""
    cls = (CAPTURED_POLICIES if captured else POLICIES).get(name)
    try:
        return cls(runtime, **options)
    except TypeError as e:  # an option this policy does not take
        raise HarnessError(f"cache={name}: {e}") from None
