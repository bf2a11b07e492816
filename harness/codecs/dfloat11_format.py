"""DFloat11's buffers, built without its per-element Python loop, and a CPU reference decoder for them.

DFloat11 (the `dfloat11` package) stores a bf16 tensor as: the exponent bytes Huffman-coded into one bit
stream (`encoded_exponent`), the sign+mantissa bytes raw (`sign_mantissa`), the decode tables (`luts`), and two
index arrays that let its CUDA kernel start every thread mid-stream: `gaps` (5 bits per thread: the bit offset of
the first code that starts in the thread's 8-byte window) and `output_positions` (uint32 per thread block of
512 x 8 bytes: the index of the first element whose code starts in that block, then the element count).

DF11's own `encode` walks the exponents one by one in Python (hours for a 1B model). `encode_exponents` computes
the same four buffers with whole-tensor torch ops on the tensor's device: code lengths -> exclusive prefix sum
(each code's start bit) -> codes OR-ed into 32-bit words (index_add_: codes never overlap, so add == OR). The
Huffman table and the LUTs still come from DF11's own `get_32bit_codec` and `get_luts` (a few hundred symbols:
cheap), so the bytes are DF11's bytes; tests/test_dfloat11.py checks that against DF11's `encode`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
from functools import cache
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from harness.errors import HarnessError, IntegrityError

# DF11's launch geometry (dfloat11.py: bytes_per_thread = 8, threads_per_block = (512,)). The kernel hardcodes the
# 8-byte window; the block size fixes the granularity of output_positions. Both change the bytes.
BYTES_PER_THREAD = 8
THREADS_PER_BLOCK = 512
WINDOW_BITS = 8 * BYTES_PER_THREAD
BLOCK_BITS = WINDOW_BITS * THREADS_PER_BLOCK
# The kernel reads a LUT entry >= 240 as "go to LUT 256 - entry": symbols (exponents) must stay below, and there is
# room for at most 16 chained LUTs.
POINTER_MIN = 240
MAX_CHAINED_LUTS = 256 - POINTER_MIN

INSTALL_HINT = "pip install 'codecllm-harness[dfloat11]' (dfloat11==0.5.0, dahuffman==0.4.2)"


def package_dir() -> Path:
    """The installed dfloat11 package's directory, found without importing it: its __init__ imports cupy (GPU only)
    and pkg_resources, neither of which the encoder needs."""
    spec = importlib.util.find_spec("dfloat11")
    if spec is None or not spec.submodule_search_locations:
        raise HarnessError(f"codec dfloat11 needs the dfloat11 package: {INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations)))


@cache
def df11_utils() -> ModuleType:
    """DF11's own `dfloat11_utils` module (Huffman table, LUTs, reference encoder), loaded from its file."""
    if importlib.util.find_spec("dahuffman") is None:
        raise HarnessError(f"codec dfloat11 needs the dahuffman package: {INSTALL_HINT}")
    path = package_dir() / "dfloat11_utils.py"
    spec = importlib.util.spec_from_file_location("_dfloat11_utils", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def split_bf16(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A bf16 tensor's exponent bytes and sign+mantissa bytes, flat, as DF11's `encode_weights` computes them."""
    w = t.detach().contiguous().view(-1).view(torch.int16)
    exponent = ((w >> 7) & 0xFF).to(torch.uint8)
    sign_mantissa = (((w >> 8) & 0x80) | (w & 0x7F)).to(torch.uint8)
    return exponent, sign_mantissa


def build_tables(exponent: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """DF11's code table (symbol -> (bits, value), with dahuffman's EOF) and LUTs for these exponents.
    The counter is built as DF11's `get_codec` builds it (ascending symbols), so ties break the same way."""
    counts = torch.bincount(exponent.view(-1).to(torch.int64), minlength=256).cpu()
    present = torch.nonzero(counts).view(-1)
    counter = dict(zip(present.tolist(), counts[present].tolist(), strict=True))
    if present.numel() and int(present[-1]) >= POINTER_MIN:
        raise HarnessError(
            f"dfloat11 cannot encode exponent byte {int(present[-1])} (inf/NaN, or |x| >= 2^113): DF11's LUTs reserve "
            f"{POINTER_MIN}-255 for table pointers; use compress.codec=zstd_grouped for this model"
        )
    utils = df11_utils()
    with contextlib.redirect_stdout(io.StringIO()):  # get_luts prints every LUT; get_32bit_codec its retries
        _, _, table = utils.get_32bit_codec(counter)
        try:
            luts = utils.get_luts(table)
        except UnboundLocalError:
            luts = utils.get_luts(_eof_as_symbol(table))
    if luts.shape[0] - 1 > MAX_CHAINED_LUTS + 1:  # rows: prefix LUTs (root + chained) and the code-length row
        raise HarnessError(
            f"dfloat11: this tensor's Huffman code needs {luts.shape[0] - 2} chained LUTs; the kernel allows {MAX_CHAINED_LUTS}"
        )
    return table, luts


def _eof_as_symbol(table: dict) -> dict:
    """DF11's get_luts skips the EOF code, and fails when that code is the all-zero one of <= 8 bits (the first LUT
    entry then has no value: small or near-constant tensors). Give EOF an unused symbol instead: its LUT entries
    are only ever reached past the last element, whose outputs the kernel discards, so decoding is unchanged."""
    used = {key for key in table if isinstance(key, int)}
    spare = min(set(range(POINTER_MIN)) - used)
    return {(spare if not isinstance(key, int) else key): code for key, code in table.items()}


def _firsts(keys: torch.Tensor) -> torch.Tensor:
    """Indices where a sorted key sequence changes (the first element of each run)."""
    change = torch.ones(keys.numel(), dtype=torch.bool, device=keys.device)
    change[1:] = keys[1:] != keys[:-1]
    return torch.nonzero(change).view(-1)


def _pack5(gaps: torch.Tensor) -> torch.Tensor:
    """Each value as 5 bits, most significant first, packed into bytes (np.packbits order, zero-padded)."""
    shifts = torch.arange(4, -1, -1, device=gaps.device)
    bits = ((gaps.to(torch.int64)[:, None] >> shifts) & 1).view(-1)
    bits = torch.nn.functional.pad(bits, (0, -bits.numel() % 8)).view(-1, 8)
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.int64, device=gaps.device)
    return (bits * weights).sum(1).to(torch.uint8)


def encode_exponents(
    exponent: torch.Tensor, table: dict, chunk: int = 1 << 24
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DF11's `encode(data, codec, 8, 512)` of these exponent bytes: (encoded, gaps, output_positions), computed on
    the exponents' device. Holds ~30 bytes per element (symbols, lengths, starts: int64); `chunk` bounds the
    packing's temporaries on top."""
    device, n = exponent.device, exponent.numel()
    eof_bits, eof_value = next(code for key, code in table.items() if not isinstance(key, int))
    lens = torch.zeros(256, dtype=torch.int64)
    values = torch.zeros(256, dtype=torch.int64)
    for key, (bits, value) in table.items():
        if isinstance(key, int):
            lens[key], values[key] = bits, value
    lens, values = lens.to(device), values.to(device)
    sym = exponent.view(-1).to(torch.int64)
    code_len = lens[sym]
    starts = torch.cumsum(code_len, 0) - code_len  # each code's first bit in the stream
    total = int(starts[-1] + code_len[-1])
    n_bytes = -(-total // 8)

    # The bit stream, EOF code included: DF11 appends one last byte holding the tail bits, then as much of the EOF
    # code as fits, then zeros (only when the stream does not end on a byte boundary). Truncating after the EOF
    # reproduces that byte.
    words = torch.zeros(-(-(total + eof_bits) // 32) + 2, dtype=torch.int64, device=device)

    def put(start: torch.Tensor, length: torch.Tensor, value: torch.Tensor) -> None:
        word, end = start >> 5, (start & 31) + length  # end <= 63: a code of <= 32 bits spans <= 2 words
        # the code left-aligned at its offset in a 64-bit pair of words (the shift may set the sign bit: only
        # the bit pattern matters; codes are disjoint, so adding them into the words never carries)
        pair = value << (64 - end)
        words.index_add_(0, word, (pair >> 32) & 0xFFFFFFFF)
        words.index_add_(0, word + 1, pair & 0xFFFFFFFF)

    for a in range(0, n, chunk):
        put(starts[a : a + chunk], code_len[a : a + chunk], values[sym[a : a + chunk]])
    put(*(torch.tensor([x], dtype=torch.int64, device=device) for x in (total, eof_bits, eof_value)))
    shifts = torch.tensor([24, 16, 8, 0], dtype=torch.int64, device=device)
    encoded = ((words[:, None] >> shifts) & 0xFF).to(torch.uint8).view(-1)[:n_bytes]

    # gaps: one per 64-bit window in which a code starts (codes are <= 32 bits, so no window is skipped) ...
    window_firsts = _firsts(starts >> 6)  # >> 6: / WINDOW_BITS
    if window_firsts.numel() != int(starts[-1] >> 6) + 1:
        raise RuntimeError("dfloat11: a 64-bit window holds no code start; the code table has codes over 32 bits")
    gaps = starts[window_firsts] & (WINDOW_BITS - 1)
    # ... output_positions: the first element of every block in which a code starts, then the element count.
    positions = _firsts(starts >> 15)  # >> 15: / BLOCK_BITS
    # DF11 checks the end of the stream once more when it ends mid-byte, as if a code started there.
    if total % 8:
        if total // WINDOW_BITS + 1 > gaps.numel():
            gaps = torch.cat([gaps, gaps.new_tensor([total % WINDOW_BITS])])
        if total // BLOCK_BITS + 1 > positions.numel():
            positions = torch.cat([positions, positions.new_tensor([n])])
    positions = torch.cat([positions, positions.new_tensor([n])])
    blocks = -(-n_bytes // (THREADS_PER_BLOCK * BYTES_PER_THREAD))
    gaps = torch.nn.functional.pad(gaps, (0, THREADS_PER_BLOCK * blocks - gaps.numel()))
    return encoded, _pack5(gaps), positions.to(torch.int32)  # int32 holds DF11's uint32 (< 2^31 elements)


def shared_mem_bytes(positions: np.ndarray) -> int:
    """Dynamic shared memory of one kernel launch, as DF11's loader sizes it: 4 bytes per thread + 4 for the
    prefix sum, then 2 bytes per element the largest block writes."""
    return THREADS_PER_BLOCK * 4 + 4 + int(np.diff(positions.astype(np.int64)).max(initial=0)) * 2


# ---- CPU reference decoder: what DF11's kernel computes, vectorised over its threads' windows with numpy ---------


def decode_exponents(
    luts: np.ndarray, encoded: np.ndarray, positions: np.ndarray, gaps_packed: np.ndarray, n: int
) -> np.ndarray:
    """The n exponent bytes. Every 8-byte window decodes the codes that start in it (from its gap on), as a kernel
    thread does; windows are laid end to end and each block's first element is checked against output_positions."""
    blocks = -(-encoded.size // (THREADS_PER_BLOCK * BYTES_PER_THREAD))
    n_windows = blocks * THREADS_PER_BLOCK
    padded = np.zeros(n_windows * BYTES_PER_THREAD + 4, np.uint8)  # +4: a window's last code may run 4 bytes on
    padded[: encoded.size] = encoded
    idx = np.arange(n_windows)[:, None] * BYTES_PER_THREAD
    hi = padded[idx + np.arange(8)].astype(np.uint64) << (np.arange(56, -8, -8, dtype=np.uint64))
    hi = np.bitwise_or.reduce(hi, axis=1)  # the window's 8 bytes, big-endian
    lo = np.bitwise_or.reduce(
        padded[idx + 8 + np.arange(4)].astype(np.uint64) << np.arange(24, -8, -8, dtype=np.uint64), axis=1
    )
    bit = np.unpackbits(gaps_packed)[: 5 * n_windows].reshape(-1, 5).astype(np.int64)
    pos = (bit * np.array([16, 8, 4, 2, 1])).sum(1).astype(np.uint64)  # bit offset in the window, < 64
    symbols = np.zeros((n_windows, WINDOW_BITS), np.uint8)
    counts = np.zeros(n_windows, np.int64)
    length_row = luts[-1]
    m32 = np.uint64(0xFFFFFFFF)
    for _ in range(WINDOW_BITS):
        active = np.nonzero(pos < WINDOW_BITS)[0]
        if active.size == 0:
            break
        p, h, lw = pos[active], hi[active], lo[active]
        s = np.uint64(64) - p  # the 32 bits at p of (hi, lo) = ((hi << 32 | lo) >> s) & m32
        left = np.minimum(np.uint64(32) - np.minimum(s, np.uint64(32)), np.uint64(31))
        code = np.where(
            s <= 32, ((h << left) | (lw >> np.minimum(s, np.uint64(32)))) & m32, (h >> (s - np.uint64(32))) & m32
        )
        d = luts[0][(code >> np.uint64(24)).astype(np.intp)]
        for shift in (16, 8, 0):  # follow LUT pointers (entries >= 240) through the next code bytes
            ptr = d >= POINTER_MIN
            row = np.where(ptr, 256 - d.astype(np.intp), 0)
            d = np.where(
                ptr,
                luts[row.clip(max=len(luts) - 2), ((code >> np.uint64(shift)) & np.uint64(0xFF)).astype(np.intp)],
                d,
            )
        symbols[active, counts[active]] = d
        counts[active] += 1
        # garbage past the stream's end may decode to length 0: step at least 1 bit, as far as output goes unchanged
        pos[active] = p + np.maximum(length_row[d], 1).astype(np.uint64)
    firsts = np.concatenate([[0], np.cumsum(counts)])[::THREADS_PER_BLOCK][: positions.size - 1]
    starts = positions[: firsts.size].astype(np.int64)
    live = starts < n  # blocks past the last element hold garbage (EOF code, padding)
    if not np.array_equal(firsts[live], starts[live]):
        raise IntegrityError("dfloat11 payload is corrupted: decoded element counts disagree with output_positions")
    flat = symbols[np.arange(WINDOW_BITS)[None, :] < counts[:, None]]
    if flat.size < n:
        raise IntegrityError(f"dfloat11 payload is corrupted: decoded {flat.size} exponents, expected {n}")
    return flat[:n]


def merge_bf16(exponent: np.ndarray, sign_mantissa: np.ndarray, out: np.ndarray) -> None:
    """bf16 bits (as uint16) from exponent and sign+mantissa bytes, into `out`."""
    np.left_shift(exponent, 7, out=out, dtype=np.uint16, casting="unsafe")
    out |= (sign_mantissa & 0x80).astype(np.uint16) << 8
    out |= sign_mantissa & 0x7F
