"""Paired, alternated rounds: the one way speed ratios are computed (the CLI run and the benchmarks).

Shared machines drift: the same generation can take twice as long a minute later. Two figures measured one after
the other absorb that drift into their ratio; the same two measured side by side, alternating, do not. Each
round times one generation of every side back to back, so a round's ratio compares two generations that ran
under the same conditions; the median over rounds is the figure, its quartiles the spread.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """(q1, median, q3); inclusive quartiles, so that 2 or 3 values give their own range."""
    values = list(values)
    if not values:
        raise ValueError("quartiles of no values")
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def paired_speed_ratio(baseline_s: Sequence[float], compressed_s: Sequence[float]) -> dict[str, float | int | list]:
    """Speed ratio per round (baseline time / compressed time: > 1 means compressed is faster), its median and
    quartiles. The rounds pair up index by index."""
    if len(baseline_s) != len(compressed_s) or not baseline_s:
        raise ValueError(f"paired rounds need equal, non-zero counts; got {len(baseline_s)} and {len(compressed_s)}")
    ratios = [b / c if c > 0 else float("inf") for b, c in zip(baseline_s, compressed_s, strict=True)]
    q1, median, q3 = quartiles(ratios)
    return {"speed_ratio": median, "speed_ratio_q1": q1, "speed_ratio_q3": q3, "rounds": len(ratios),
            "speed_ratio_per_round": ratios}


@dataclass
class Timing:
    wall_s: float  # host clock, the device synchronised at both ends
    gpu_s: float | None  # CUDA events on the current stream around the work (None on the CPU)


class Timer:
    """start() ... stop() -> Timing: the split form of `timed`, for callers whose work starts and ends in
    different places (Lightning's batch-start and batch-end hooks)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._events: tuple[torch.cuda.Event, torch.cuda.Event] | None = None
        self._t0 = 0.0

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # nothing earlier may run into this window
            self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            self._t0 = time.perf_counter()
            self._events[0].record()
        else:
            self._t0 = time.perf_counter()

    def stop(self) -> Timing:
        if self._events is None:
            return Timing(time.perf_counter() - self._t0, None)
        start, end = self._events
        end.record()
        torch.cuda.synchronize(self.device)
        return Timing(time.perf_counter() - self._t0, start.elapsed_time(end) / 1e3)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[object, Timing]:
    """Run fn once; its wall-clock time with the device synchronised at both ends, and its CUDA-event time."""
    timer = Timer(device)
    timer.start()
    out = fn()
    return out, timer.stop()


def host_overhead(timing: Timing) -> float | None:
    """Wall time outside the CUDA-event window: host work before the first kernel of the generation is queued
    (tokenising, generate()'s set-up) and after the last one ends (the final sync, copies back). Idle gaps of
    the GPU *inside* the generation are not in it (they are in gpu_s); None on the CPU, where there is no
    separate device clock."""
    return None if timing.gpu_s is None else max(timing.wall_s - timing.gpu_s, 0.0)


def alternate(sides: Sequence[str], rounds: int) -> list[list[str]]:
    """The order of the sides in each round: rotated every round, so no side always runs first (after whatever
    ran before the round) or always runs right after the same other side."""
    n = len(sides)
    return [[sides[(r + i) % n] for i in range(n)] for r in range(rounds)]
