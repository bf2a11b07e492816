"""Measurement primitives: synchronised wall-clock timing, CUDA/CPU memory per phase, medians with spread."""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import psutil
import torch


def forward_pass_hooks(model: torch.nn.Module, start: Callable[[], object], end: Callable[[], object] | None = None) -> list:
    """The one definition of a forward pass, for the phases' callbacks, the runtime's pass boundaries and the
    fidelity run's count: a call of the top-level model. `start()` runs before it and `end()` after it, as host
    logic (under torch.compile, eagerly between graphs). Returns the hook handles, to remove."""
    hooks = [model.register_forward_pre_hook(torch.compiler.disable(lambda *_: start()))]
    if end is not None:
        hooks.append(model.register_forward_hook(torch.compiler.disable(lambda *_: end())))
    return hooks


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def spread(values: list[float]) -> dict[str, float]:
    """Median with min and max: the figure and how far repeats strayed from it."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


class _RssSampler(threading.Thread):
    """Samples this process's RSS every `interval_s` to estimate its peak (CPU has no allocator peak counter)."""

    def __init__(self, interval_s: float = 0.002) -> None:
        super().__init__(daemon=True, name="rss-sampler")
        self.interval_s = interval_s
        self.process = psutil.Process(os.getpid())
        self.peak_bytes = self.process.memory_info().rss
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.interval_s):
            self.peak_bytes = max(self.peak_bytes, self.process.memory_info().rss)

    def stop(self) -> int:
        self._halt.set()
        self.join()
        self.peak_bytes = max(self.peak_bytes, self.process.memory_info().rss)
        return self.peak_bytes


@dataclass
class MemoryReading:
    kind: str  # "cuda" (torch allocator: memory_allocated / max_memory_allocated) or "cpu_rss" (process RSS)
    before_bytes: int
    after_bytes: int
    peak_bytes: int

    @property
    def delta_bytes(self) -> int:
        return self.after_bytes - self.before_bytes

    def as_dict(self) -> dict:
        return {
            "kind": self.kind,
            "before_bytes": self.before_bytes,
            "after_bytes": self.after_bytes,
            "peak_bytes": self.peak_bytes,
            "delta_bytes": self.delta_bytes,
        }


class MemoryMeter:
    """start() at the beginning of a phase (peak statistics reset), stop() at its end."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._before = 0
        self._sampler: _RssSampler | None = None

    def start(self) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._before = torch.cuda.memory_allocated(self.device)
        else:
            self._sampler = _RssSampler()
            self._before = self._sampler.peak_bytes
            self._sampler.start()

    def stop(self) -> MemoryReading:
        if self.device.type == "cuda":
            sync(self.device)
            return MemoryReading(
                "cuda",
                self._before,
                torch.cuda.memory_allocated(self.device),
                torch.cuda.max_memory_allocated(self.device),
            )
        peak = self._sampler.stop()
        return MemoryReading("cpu_rss", self._before, psutil.Process(os.getpid()).memory_info().rss, peak)


class Stopwatch:
    """Wall-clock seconds between start() and stop(), with the device synchronised at both ends."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._t0 = 0.0

    def start(self) -> None:
        sync(self.device)
        self._t0 = time.perf_counter()

    def stop(self) -> float:
        sync(self.device)
        return time.perf_counter() - self._t0


def model_weight_bytes(model: torch.nn.Module) -> int:
    """Exact bytes of every parameter and buffer the model holds densely (shared tensors counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total
