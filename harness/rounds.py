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


def timed(fn: Callable[[], object], device: torch.device) -> tuple[object, Timing]:
    """Run fn once; its wall-clock time with the device synchronised at both ends, and its CUDA-event time."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        out = fn()
        end.record()
        torch.cuda.synchronize(device)
        return out, Timing(time.perf_counter() - t0, start.elapsed_time(end) / 1e3)
    t0 = time.perf_counter()
    out = fn()
    return out, Timing(time.perf_counter() - t0, None)


def alternate(sides: Sequence[str], rounds: int) -> list[list[str]]:
    """The order of the sides in each round: rotated every round, so no side always runs first (after whatever
    ran before the round) or always runs right after the same other side."""
    n = len(sides)
    return [[sides[(r + i) % n] for i in range(n)] for r in range(rounds)]
