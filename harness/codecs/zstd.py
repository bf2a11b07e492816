"""zstd codecs: `zstd` compresses the raw weight bytes; `zstd_grouped` compresses byte planes separately.
(Just past 300 lines: two codecs over one chunked-frame base, its thread pool and scratch buffers.)

Both cut the tensor into chunks of `chunk_bytes` (original bytes) so encode and decode can run on several
threads (zstandard releases the GIL), and concatenate every frame into one flat uint8 payload; `meta` holds
each frame's offset and size. Decoding writes each frame straight into its slice of the output
(`stream_reader(frame).readinto(slice)` takes zstd's single-pass path when the frame records its content
size), which measured faster than `decompress()` + copy or `multi_decompress_to_buffer` and is the only one of
the three that scales with threads.

Why planes: in a bf16 weight the 8 exponent bits carry ~2.7 bits of entropy while sign and mantissa are
near-random (docs/physics.md, docs/benchmarks.md). Interleaved, zstd cannot model the exponent well;
as its own plane it compresses to ~0.36-0.40 of its size (level 1-3), and the incompressible plane is stored raw.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from itertools import accumulate
from typing import Any, TypeVar

import numpy as np
import torch
import xxhash
import zstandard

from harness.codecs.base import CODECS, DTYPES, Codec, CompressedTensor, cpu_output, dtype_name, raw_bytes
from harness.errors import HarnessError, IntegrityError

if sys.byteorder != "little":  # the plane layouts below index bytes of little-endian words
    raise ImportError("harness.codecs.zstd assumes a little-endian host")

# 1 MiB: on SmolLM2 within 0.01% of one frame per tensor, or better; 256/512 KiB chunks move zstd onto its
# small-input parameter tables, which shifts the ratio by up to +-4% depending on codec and level (docs/benchmarks.md).
DEFAULT_CHUNK_BYTES = 1 << 20

# A plane chunk is stored raw unless zstd saves at least this fraction: sign/mantissa planes save ~0%, and a
# raw plane decodes with no zstd pass at all.
MIN_SAVING = 1 / 32

T = TypeVar("T")
_local = threading.local()  # per-thread zstd contexts and scratch buffers (contexts are not thread-safe)


@cache
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix=f"zstd{threads}")


os.register_at_fork(after_in_child=_pool.cache_clear)  # a forked child has none of the parent's pool threads


def _map(fn: Callable[[int], T], n: int, threads: int) -> list[T]:
    if threads <= 1 or n <= 1:
        return [fn(i) for i in range(n)]
    return list(_pool(threads).map(fn, range(n)))


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cctxs = _local.__dict__.setdefault("cctx", {})
    if level not in cctxs:
        cctxs[level] = zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True)
    return cctxs[level]


def _decompress_into(frame: np.ndarray, dst: np.ndarray, index: int) -> None:
    """Decompress one frame into `dst` (uint8, exactly the frame's content size), no intermediate copy."""
    if not hasattr(_local, "dctx"):
        _local.dctx = zstandard.ZstdDecompressor()
    try:
        with _local.dctx.stream_reader(frame) as reader:
            got = reader.readinto(dst)
    except zstandard.ZstdError as e:
        raise IntegrityError(f"zstd frame {index} is corrupted: {e}") from e
    if got != dst.nbytes:
        raise IntegrityError(f"zstd frame {index} holds {got} bytes, expected {dst.nbytes}")


def _scratch(key: str, n: int, dtype: type[np.generic]) -> np.ndarray:
    """A per-thread reusable buffer of n items (decode runs per layer per forward pass: no allocations)."""
    bufs = _local.__dict__.setdefault("scratch", {})
    buf = bufs.get(key)
    if buf is None or buf.size < n:
        buf = bufs[key] = np.empty(n, dtype)
    return buf[:n]


def _payload(frames: Iterable[np.ndarray | bytes], total_nbytes: int) -> torch.Tensor:
    """All frames back to back in one flat uint8 tensor, pinned when CUDA is present (fast host->device copy)."""
    payload = torch.empty(total_nbytes, dtype=torch.uint8, pin_memory=torch.cuda.is_available())
    dst = payload.numpy()
    pos = 0
    for f in frames:
        n = len(f) if isinstance(f, bytes) else f.nbytes
        dst[pos : pos + n] = np.frombuffer(f, np.uint8)
        pos += n
    assert pos == total_nbytes
    return payload


def _offsets(sizes: list[int]) -> list[int]:
    return [0, *accumulate(sizes[:-1])] if sizes else []




class _ZstdBase(Codec):
    def __init__(self, level: int = 3, threads: int = 1, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        if not isinstance(level, int) or not 1 <= level <= zstandard.MAX_COMPRESSION_LEVEL:
            raise HarnessError(
                f"{self.name}: level={level!r} is invalid; use an integer in 1..{zstandard.MAX_COMPRESSION_LEVEL}"
            )
        if not isinstance(threads, int) or threads < 1:
            raise HarnessError(f"{self.name}: threads={threads!r} is invalid; use an integer >= 1")
        if not isinstance(chunk_bytes, int) or chunk_bytes < 4:
            raise HarnessError(
                f"{self.name}: chunk_bytes={chunk_bytes!r} is invalid; use an integer >= 4 (default 1 MiB)"
            )
        self.level, self.threads, self.chunk_bytes = level, threads, chunk_bytes

    def settings(self) -> dict[str, Any]:
        return {"level": self.level, "chunk_bytes": self.chunk_bytes}

    def _check(self, ct: CompressedTensor) -> None:
        if ct.codec != self.name:
            raise ValueError(f"codec {self.name!r} cannot decode a tensor compressed with {ct.codec!r}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(level={self.level}, threads={self.threads}, chunk_bytes={self.chunk_bytes})"


@CODECS.register("zstd")
class ZstdCodec(_ZstdBase):
    """zstd over the raw weight bytes, one frame per `chunk_bytes`."""

    name = "zstd"

    def encode(self, t: torch.Tensor) -> CompressedTensor:
        if dtype_name(t.dtype) not in DTYPES:
            raise HarnessError(f"{self.name}: unsupported dtype {t.dtype}; supported: {', '.join(DTYPES)}")
        data = raw_bytes(t)
        src = data.numpy()
        starts = range(0, src.nbytes, self.chunk_bytes)
        frames = _map(
            lambda i: _compressor(self.level).compress(src[starts[i] : starts[i] + self.chunk_bytes]),
            len(starts),
            self.threads,
        )
        sizes = [len(f) for f in frames]
        return CompressedTensor.of(
            self.name,
            t,
            _payload(frames, sum(sizes)),
            meta={
                "level": self.level,
                "chunk_bytes": self.chunk_bytes,
                "frame_offsets": _offsets(sizes),
                "frame_nbytes": sizes,
            },
        )

    def decode(self, ct: CompressedTensor, out: torch.Tensor | None = None) -> torch.Tensor:
        self._check(ct)
        out = cpu_output(ct, out)
        dst = out.view(-1).view(torch.uint8).numpy()
        src = ct.payload.numpy()
        chunk, offs, sizes = ct.meta["chunk_bytes"], ct.meta["frame_offsets"], ct.meta["frame_nbytes"]

        def one(i: int) -> None:
            _decompress_into(src[offs[i] : offs[i] + sizes[i]], dst[i * chunk : (i + 1) * chunk], i)

        _map(one, len(sizes), self.threads)
        return out


# ---- byte-plane layouts: split a chunk of words into byte planes (most significant first) and merge back ------
# bf16 `s eeeeeeee mmmmmmm` becomes two planes: the exponent byte `eeeeeeee` and `s mmmmmmm`. Isolating the
# exponent beats plain byte planes on all SmolLM2-135M linears (level 3: 1.4265x vs 1.4145x; level 1: 1.4663x vs
# 1.4599x) because the random sign bit no longer dilutes the exponent plane; it costs 2-8% of single-thread
# decode speed (level 3 / level 1) in the merge. The sign/mantissa plane is stored raw anyway, so its bit order
# is chosen for the cheapest merge: 4 numpy passes (~8 GB/s a thread) where undoing a 1-bit rotation of the
# whole word took 5 (~6 GB/s); plain byte planes merge in 2 (~11 GB/s).
# fp32 splits its upper 16 bits (its bf16 part) the same way and keeps the low 16 bits as two byte planes, so
# fp32 weights upcast from bf16 still get all-zero low planes. fp16 has a 5-bit exponent that no byte boundary
# isolates (a rotation measured no gain), so it uses plain byte planes.


def _split_bf16(w: np.ndarray) -> list[np.ndarray]:
    exp = (w >> 7).astype(np.uint8)  # the cast drops the sign bit
    sign_mant = (((w >> 8) & 0x80) | (w & 0x7F)).astype(np.uint8)
    return [exp, sign_mant]


def _merge_bf16(planes: list[np.ndarray], out: np.ndarray) -> None:
    exp, sign_mant = planes
    tmp = _scratch("u16", out.size, np.uint16)
    np.multiply(sign_mant, 257, out=tmp, dtype=np.uint16)  # sm<<8 | sm: sign lands on bit 15, mantissa on 0-6
    np.bitwise_and(tmp, 0x807F, out=tmp)
    np.left_shift(exp, 7, out=out, dtype=np.uint16, casting="unsafe")
    np.bitwise_or(out, tmp, out=out)


def _split_fp16(w: np.ndarray) -> list[np.ndarray]:
    b = w.view(np.uint8)
    return [b[1::2].copy(), b[0::2].copy()]


def _merge_fp16(planes: list[np.ndarray], out: np.ndarray) -> None:
    np.left_shift(planes[0], 8, out=out, dtype=np.uint16, casting="unsafe")
    np.bitwise_or(out, planes[1], out=out)


def _split_fp32(w: np.ndarray) -> list[np.ndarray]:
    halves = w.view(np.uint16)
    b = w.view(np.uint8)
    return [*_split_bf16(halves[1::2].copy()), b[1::4].copy(), b[0::4].copy()]


def _merge_fp32(planes: list[np.ndarray], out: np.ndarray) -> None:
    upper = _scratch("u16_upper", out.size, np.uint16)
    _merge_bf16(planes[:2], upper)
    tmp = _scratch("u32", out.size, np.uint32)
    np.left_shift(upper, 16, out=out, dtype=np.uint32, casting="unsafe")
    np.left_shift(planes[2], 8, out=tmp, dtype=np.uint32, casting="unsafe")
    np.bitwise_or(out, tmp, out=out)
    np.bitwise_or(out, planes[3], out=out)


# dtype -> (word type, layout name recorded in meta, split, merge)
_LAYOUTS: dict[str, tuple[type[np.generic], str, Callable, Callable]] = {
    "bfloat16": (np.uint16, "bf16_exp_signmant", _split_bf16, _merge_bf16),
    "float16": (np.uint16, "bytes", _split_fp16, _merge_fp16),
    "float32": (np.uint32, "upper_bf16_then_bytes", _split_fp32, _merge_fp32),
}


@CODECS.register("zstd_grouped")
class ZstdGroupedCodec(_ZstdBase):
    """zstd on byte planes (exponent isolated for bf16/fp32), per chunk; planes zstd cannot shrink stay raw."""

    name = "zstd_grouped"

    def encode(self, t: torch.Tensor) -> CompressedTensor:
        dtype = dtype_name(t.dtype)
        if dtype not in _LAYOUTS:
            raise HarnessError(f"{self.name}: unsupported dtype {t.dtype}; supported: {', '.join(_LAYOUTS)}")
        word, layout, split, _ = _LAYOUTS[dtype]
        data = raw_bytes(t)
        words = data.numpy().view(word)
        chunk_elems = max(1, self.chunk_bytes // words.itemsize)
        starts = range(0, words.size, chunk_elems)

        def one(i: int) -> list[tuple[np.ndarray | bytes, str]]:
            stored = []
            for plane in split(words[starts[i] : starts[i] + chunk_elems]):
                z = _compressor(self.level).compress(plane)
                stored.append((z, "z") if len(z) <= plane.nbytes * (1 - MIN_SAVING) else (plane, "r"))
            return stored

        frames = [f for chunk in _map(one, len(starts), self.threads) for f in chunk]
        sizes = [len(f) if kind == "z" else f.nbytes for f, kind in frames]
        return CompressedTensor.of(
            self.name,
            t,
            _payload((f for f, _ in frames), sum(sizes)),
            meta={
                "level": self.level,
                "layout": layout,
                "chunk_elems": chunk_elems,
                "frame_offsets": _offsets(sizes),
                "frame_nbytes": sizes,
                "frame_kinds": "".join(kind for _, kind in frames),  # per frame, chunk-major: z = zstd, r = raw
                # zstd frames check themselves; raw ones carry an xxh3, so that corruption after the runtime's
                # first verified decode (compress.verify=first) is still caught on every decode
                "raw_xxh3": {str(i): xxhash.xxh3_64_intdigest(f) for i, (f, kind) in enumerate(frames) if kind == "r"},
            },
        )

    def decode(self, ct: CompressedTensor, out: torch.Tensor | None = None) -> torch.Tensor:
        self._check(ct)
        word, layout, _, merge = _LAYOUTS[ct.dtype]
        if ct.meta["layout"] != layout:
            raise ValueError(f"{self.name}: unknown plane layout {ct.meta['layout']!r} for {ct.dtype}")
        out = cpu_output(ct, out)
        words = out.view(-1).view(torch.uint8).numpy().view(word)  # numpy has no bf16: go through bytes
        src = ct.payload.numpy()
        chunk, offs, sizes, kinds = (
            ct.meta[k] for k in ("chunk_elems", "frame_offsets", "frame_nbytes", "frame_kinds")
        )
        n_planes = words.itemsize
        raw_xxh3 = ct.meta["raw_xxh3"]

        def one(i: int) -> None:
            dst = words[i * chunk : (i + 1) * chunk]
            planes = []
            for p in range(n_planes):
                f = i * n_planes + p
                frame = src[offs[f] : offs[f] + sizes[f]]
                if kinds[f] == "r":
                    if xxhash.xxh3_64_intdigest(frame) != raw_xxh3[str(f)]:
                        raise IntegrityError(f"raw frame {f} is corrupted (xxh3 mismatch)")
                    planes.append(frame)
                else:
                    plane = _scratch(f"plane{p}", dst.size, np.uint8)
                    _decompress_into(frame, plane, f)
                    planes.append(plane)
            merge(planes, dst)

        _map(one, len(sizes) // n_planes, self.threads)
        return out
