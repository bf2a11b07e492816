"""Exact counters for one phase of compressed inference. Thread-safe: prefetch workers update them too."""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Stats:
    forward_passes: int = 0
    decompressions: int = 0
    decompressions_per_layer: Counter = field(default_factory=Counter)
    decompressions_per_pass: list[int] = field(default_factory=list)
    decompress_time_s: float | None = 0.0  # None: decodes inside captured steps, not timed by the host
    bytes_decompressed: int = 0
    resident_bytes: int = 0  # decompressed weights alive right now
    peak_resident_bytes: int = 0
    verifications: int = 0
    # cache=fused: layers whose weight the kernel decoded in registers (never written out), and their 16-row tiles
    in_kernel_decodes: int = 0
    in_kernel_decodes_per_layer: Counter = field(default_factory=Counter)
    in_kernel_decodes_per_pass: list[int] = field(default_factory=list)
    in_kernel_tiles: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def begin_pass(self) -> None:
        with self._lock:
            self.forward_passes += 1
            self.decompressions_per_pass.append(0)
            self.in_kernel_decodes_per_pass.append(0)

    def count_decompression(self, layer: str, nbytes: int, seconds: float) -> None:
        with self._lock:
            self.decompressions += 1
            self.decompressions_per_layer[layer] += 1
            if self.decompressions_per_pass:  # work before the first pass (none today) has no pass to go to
                self.decompressions_per_pass[-1] += 1
            self.decompress_time_s += seconds
            self.bytes_decompressed += nbytes

    def count_many(self, layers, seconds: float) -> None:
        """Decompressions of several layers (`.name`, `.weight_nbytes`) in one call, which took `seconds`
        in all; they become resident together. One lock for the whole block."""
        nbytes = sum(layer.weight_nbytes for layer in layers)
        with self._lock:
            self.decompressions_per_layer.update(layer.name for layer in layers)
            self.bytes_decompressed += nbytes
            self.resident_bytes += nbytes
            self.decompressions += len(layers)
            if self.decompressions_per_pass:
                self.decompressions_per_pass[-1] += len(layers)
            self.decompress_time_s += seconds
            self.peak_resident_bytes = max(self.peak_resident_bytes, self.resident_bytes)

    def add_passes(self, per_pass: list[list[int]], bytes_per_pass: list[list[int]], layers) -> None:
        """Counts read from the device after a generation of captured decodes: `per_pass[p][i]` decodes of
        `layers[i]` (and `bytes_per_pass[p][i]` bytes) in the p-th pass begun since the last reset. Their time is
        not measured (it is GPU time inside the step); `decompress_time_s` becomes None."""
        with self._lock:
            offset = len(self.decompressions_per_pass) - len(per_pass)
            if offset < 0:
                raise RuntimeError(f"captured counts for {len(per_pass)} passes, but {len(self.decompressions_per_pass)} began")
            for p, (row, nbytes) in enumerate(zip(per_pass, bytes_per_pass, strict=True)):
                for layer, n, b in zip(layers, row, nbytes, strict=True):
                    if n:
                        self.decompressions_per_layer[layer.name] += n
                        self.bytes_decompressed += b
                total = sum(row)
                self.decompressions += total
                self.decompressions_per_pass[offset + p] += total
            self.decompress_time_s = None

    def add_in_kernel(self, per_pass: list[list[int]], layers, tiles: list[int]) -> None:
        """In-kernel decodes read from the device after a generation: `per_pass[p][i]` launches for `layers[i]`
        (each decoding `tiles[i]` tiles) in the p-th pass begun since the last reset."""
        with self._lock:
            offset = len(self.in_kernel_decodes_per_pass) - len(per_pass)
            if offset < 0:
                began = len(self.in_kernel_decodes_per_pass)
                raise RuntimeError(f"in-kernel counts for {len(per_pass)} passes, but {began} began")
            for p, row in enumerate(per_pass):
                for layer, n, t in zip(layers, row, tiles, strict=True):
                    if n:
                        self.in_kernel_decodes_per_layer[layer.name] += n
                        self.in_kernel_tiles += n * t
                self.in_kernel_decodes += sum(row)
                self.in_kernel_decodes_per_pass[offset + p] += sum(row)

    def hold(self, nbytes: int) -> None:
        with self._lock:
            self.resident_bytes += nbytes
            self.peak_resident_bytes = max(self.peak_resident_bytes, self.resident_bytes)

    def unhold(self, nbytes: int) -> None:
        with self._lock:
            self.resident_bytes -= nbytes

    def reset(self) -> None:
        """Zero every counter; bytes still resident stay counted (they are still alive)."""
        with self._lock:
            self.forward_passes = 0
            self.decompressions = 0
            self.decompressions_per_layer = Counter()
            self.decompressions_per_pass = []
            self.decompress_time_s = 0.0
            self.bytes_decompressed = 0
            self.peak_resident_bytes = self.resident_bytes
            self.verifications = 0
            self.in_kernel_decodes = 0
            self.in_kernel_decodes_per_layer = Counter()
            self.in_kernel_decodes_per_pass = []
            self.in_kernel_tiles = 0

    def snapshot(self) -> dict:
        with self._lock:
            passes = self.forward_passes
            return {
                "forward_passes": passes,
                "decompressions": self.decompressions,
                "decompressions_per_forward_pass": self.decompressions / passes if passes else 0.0,
                "decompressions_per_pass": list(self.decompressions_per_pass),
                "decompressions_per_layer": dict(self.decompressions_per_layer),
                "decompress_time_s": self.decompress_time_s,
                "bytes_decompressed": self.bytes_decompressed,
                "peak_resident_decompressed_bytes": self.peak_resident_bytes,
                "in_kernel_decodes": self.in_kernel_decodes,
                "in_kernel_decodes_per_forward_pass": self.in_kernel_decodes / passes if passes else 0.0,
                "in_kernel_decodes_per_pass": list(self.in_kernel_decodes_per_pass),
                "in_kernel_decodes_per_layer": dict(self.in_kernel_decodes_per_layer),
                "in_kernel_tiles": self.in_kernel_tiles,
            }
