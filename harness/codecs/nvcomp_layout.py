"""The chunked payload of `nvcomp_ans_batched`: layout, header, and the chunk tables a batched decode needs.

Plain Python and torch on any device (unit-tested without a GPU); the codec itself is in nvcomp_batched.py.

Payload (flat uint8; little-endian uint64 words, then the chunks at 16-byte aligned offsets):
    [MAGIC, nbytes, chunk_bytes, num_chunks, offset_0 .. offset_num_chunks, size_0 .. size_{num-1}] [pad to 16]
    [chunk 0][pad][chunk 1]...
`offset_i` is chunk i's start relative to the end of the header (16-byte aligned), `offset_num` the end of the
data, `size_i` chunk i's exact compressed size. Chunks hold whole rows (last dimension) where rows fit, so that
an embedding lookup can decode only the chunks holding its rows.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from harness.codecs.base import CompressedTensor

MAGIC = 0x4E56414E53303031  # "NVANS001"
ALIGN = 16  # nvcompANSRequiredDecompressionAlignment / ...CompressionAlignment


def align_up(n: int, a: int = ALIGN) -> int:
    return -(-n // a) * a


def chunk_sizes(nbytes: int, chunk_bytes: int) -> list[int]:
    """Uncompressed size of each chunk: full chunks, then the remainder."""
    if nbytes <= 0:
        return []
    full, rest = divmod(nbytes, chunk_bytes)
    return [chunk_bytes] * full + ([rest] if rest else [])


def header_words(nbytes: int, chunk_bytes: int, compressed_sizes: list[int]) -> list[int]:
    offsets, pos = [], 0
    for size in compressed_sizes:
        offsets.append(pos)
        pos = align_up(pos + size)
    offsets.append(pos)
    return [MAGIC, nbytes, chunk_bytes, len(compressed_sizes), *offsets, *compressed_sizes]


def header_nbytes(num_chunks: int) -> int:
    return align_up(8 * (5 + 2 * num_chunks))


@dataclass(frozen=True)
class Layout:
    nbytes: int
    chunk_bytes: int
    offsets: tuple[int, ...]  # num_chunks + 1, relative to data_start
    sizes: tuple[int, ...]  # num_chunks exact compressed sizes
    data_start: int

    @property
    def num_chunks(self) -> int:
        return len(self.sizes)


def parse_header(payload: torch.Tensor) -> Layout:
    """Read a payload's header (any device; copies only the header words to the host)."""
    if payload.numel() < 40:
        raise ValueError("payload shorter than its header")
    head = payload[:40].cpu().view(torch.int64).tolist()
    magic, nbytes, chunk_bytes, num = head[0] & 0xFFFFFFFFFFFFFFFF, head[1], head[2], head[3]
    if magic != MAGIC or chunk_bytes <= 0 or num != len(chunk_sizes(nbytes, chunk_bytes)):
        raise ValueError("bad header (not a chunked nvCOMP ANS payload)")
    start = header_nbytes(num)
    if payload.numel() < start:
        raise ValueError("payload shorter than its header")
    words = payload[32 : 32 + 8 * (2 * num + 1)].cpu().view(torch.int64).tolist()
    offsets, sizes = tuple(words[: num + 1]), tuple(words[num + 1 :])
    if (offsets[0] != 0 or start + offsets[-1] != payload.numel()
            or any(size <= 0 or a + size > b for a, b, size in zip(offsets[:-1], offsets[1:], sizes, strict=True))):
        raise ValueError("bad chunk offsets")
    return Layout(nbytes, chunk_bytes, offsets, sizes, start)


def row_aligned_chunk_bytes(shape: tuple[int, ...], element_size: int, target: int) -> int:
    """The chunk size for a tensor: whole rows (last dimension) per chunk, as close to `target` as fits, so that
    an embedding lookup can decode just the chunks holding its rows. Rows larger than `target` (or tensors of
    one dimension) use `target`; nvCOMP takes chunks up to 16 MiB, of even size for 16-bit data."""
    if len(shape) < 2:
        return target
    row = shape[-1] * element_size
    if row > target:
        return target
    return row * (target // row)


# id(ct) -> its parsed layout, dropped with the tensor: the codecs' state, kept here rather than on the tensor
_LAYOUTS: dict[int, Layout] = {}


def layout_of(ct: CompressedTensor) -> Layout:
    """The chunk layout of a CompressedTensor's payload, parsed once per object."""
    layout = _LAYOUTS.get(id(ct))
    if layout is None:
        layout = parse_header(ct.payload)
        if layout.nbytes != ct.original_nbytes:
            raise ValueError(f"payload holds {layout.nbytes} bytes, the tensor {ct.original_nbytes}")
        _LAYOUTS[id(ct)] = layout
        weakref.finalize(ct, _LAYOUTS.pop, id(ct), None)
    return layout


def chunk_tables(cts: list[CompressedTensor]) -> dict[str, list[int]]:
    """The chunks of `cts` back to back, as one batched decode sees them: each chunk's offset from its
    payload's start and its compressed size, its offset in its output and its size there, and which tensor
    it belongs to."""
    rel_comp, comp_bytes, rel_out, out_bytes, which = [], [], [], [], []
    for k, ct in enumerate(cts):
        layout = layout_of(ct)
        rel_comp += [layout.data_start + o for o in layout.offsets[:-1]]
        comp_bytes += list(layout.sizes)
        sizes = chunk_sizes(layout.nbytes, layout.chunk_bytes)
        rel_out += [i * layout.chunk_bytes for i in range(len(sizes))]
        out_bytes += sizes
        which += [k] * len(sizes)
    return {"rel_comp": rel_comp, "comp_bytes": comp_bytes, "rel_out": rel_out, "out_bytes": out_bytes, "which": which}


def pack(words: list[int], chunks: list[torch.Tensor]) -> torch.Tensor:
    """Header words + compressed chunks (uint8, any device) -> one payload on the chunks' device."""
    num = words[3]
    offsets = words[4 : 5 + num]
    start = header_nbytes(num)
    device = chunks[0].device if chunks else torch.device("cpu")
    out = torch.zeros(start + offsets[-1], dtype=torch.uint8, device=device)
    head = torch.tensor([w - (1 << 64) if w >= 1 << 63 else w for w in words], dtype=torch.int64)
    out[: 8 * len(words)] = head.view(torch.uint8).to(device)
    for chunk, offset in zip(chunks, offsets[:-1], strict=True):
        out[start + offset : start + offset + chunk.numel()] = chunk
    return out
