"""The "exp3" lossless bf16 format: a 3-bit exponent code per weight, the sign+mantissa byte raw, escapes inline.

bf16 = 1 sign, 8 exponent, 7 mantissa bits. In trained (and random-normal) weights the exponent carries ~2.6-2.8
bits of entropy and sits in a narrow window; sign and mantissa are near random. So per tensor we pick the 7-wide
window of consecutive exponents [base, base+6] holding the most weights: code = exponent - base (0..6), and code 7
is an escape whose true exponent byte is stored in a side stream. A window, not "the 7 most frequent exponents",
because the kernel then decodes with one add (exponent = base + code) instead of a table lookup; for unimodal
exponent histograms the two choose the same set (docs/fused.md measures both).

Layout (W is [N, K], the kernel computes x @ W.T and reads row blocks [BLOCK_N, tk] per step, K contiguous):
  signman [Np, Kp] uint8   bit 7 = sign, bits 0..6 = mantissa; row-major, so a row segment of a tile is tk
                           contiguous bytes (full 128-byte lines for 16-byte vector loads)
  code2   [Np, Kp/4] uint8 low two code bits, 4 weights per byte: weight k at bits 2*(k%4)
  code1   [Np, Kp/8] uint8 high code bit, 8 weights per byte: weight k at bit k%8
  esc     [n_esc] uint8    true exponents of escaped weights, ordered by (k block, row, k): the escapes of rows
                           n0..n0+BLOCK_N-1 in one k block are contiguous, so a tile needs one offset and an
                           in-tile prefix sum (rank) to patch them inline
  esc_off [Kp/tk, Np/16] int32  index in esc of the first escape of (k block, 16-row group)
Np, Kp are N, K rounded up to 16 and tk; padding has code 0 and signman 0 (a finite value; the kernel multiplies
it by a zero-padded x), never an escape.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ROW_GROUP = 16  # escape offsets per 16 rows: the kernel's BLOCK_N is any multiple of it
ESCAPE = 7
HEADER_BYTES = 16  # base, N, K, tk as 4 bytes each: counted so nbytes is the whole stored size


@dataclass(frozen=True)
class Packed:
    signman: torch.Tensor
    code2: torch.Tensor
    code1: torch.Tensor
    esc: torch.Tensor  # [n_esc] int16: (true exponent << 8) | (k % tk), ordered (row, k)
    esc_row: torch.Tensor  # [Np] int32: index in esc of row r's first escape
    esc_blk: torch.Tensor  # [Np, Kp/tk + 1] int16: escapes of row r before k block kb (last column: row total)
    base: int
    shape: tuple[int, int]
    tk: int

    FIELDS = ("signman", "code2", "code1", "esc", "esc_row", "esc_blk")

    @property
    def nbytes(self) -> int:
        """Exact stored size, padding included (one dummy escape entry when there are none is counted too)."""
        return HEADER_BYTES + sum(getattr(self, f).numel() * getattr(self, f).element_size() for f in self.FIELDS)

    @property
    def dense_nbytes(self) -> int:
        return 2 * self.shape[0] * self.shape[1]

    @property
    def ratio(self) -> float:
        return self.dense_nbytes / self.nbytes

    def to(self, device: torch.device | str) -> Packed:
        move = {f: getattr(self, f).to(device) for f in self.FIELDS}
        return Packed(**move, base=self.base, shape=self.shape, tk=self.tk)

    @property
    def device(self) -> torch.device:
        return self.signman.device


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def exponent_histogram(w: torch.Tensor) -> torch.Tensor:
    """Counts of the 256 bf16 exponent values (int64, on w's device)."""
    exp = (w.contiguous().view(torch.int16).to(torch.int32) >> 7) & 0xFF
    return torch.bincount(exp.flatten(), minlength=256)


def best_window(hist: torch.Tensor, width: int = ESCAPE) -> int:
    """The base b maximising the count of exponents in [b, b+width-1] (ties: the smallest b)."""
    sums = hist.cumsum(0)
    padded = torch.cat([sums.new_zeros(1), sums])
    windows = padded[width:] - padded[:-width]  # windows[b] = sum(hist[b : b+width])
    return int(torch.argmax(windows))


def choose_tk(k: int) -> int:
    """The k block wasting the least padding, the larger on ties: K=4096 -> 256, but K=576 (SmolLM2) -> 64, where
    256 would pad the row to 768. At most 256: an escape stores its position in the block in 8 bits."""
    return min((256, 128, 64), key=lambda t: (_round_up(max(k, 1), t), -t))


def encode(w: torch.Tensor, tk: int | None = None) -> Packed:
    """Pack a 2-D bf16 tensor; runs on w's device (GPU: an 8B model in seconds; CPU: fine for tests).
    tk: the k block (the kernel's BLOCK_K, 64/128/256); None picks it from K (choose_tk)."""
    if w.dtype != torch.bfloat16 or w.dim() != 2:
        raise ValueError(f"encode wants a 2-D bfloat16 tensor, got {w.dtype} {tuple(w.shape)}")
    tk = choose_tk(w.shape[1]) if tk is None else tk
    if tk not in (64, 128, 256):
        raise ValueError(f"tk={tk} must be 64, 128 or 256")
    n, k = w.shape
    np_, kp = _round_up(max(n, 1), ROW_GROUP), _round_up(max(k, 1), tk)
    if kp > 32767:
        raise ValueError(f"K={k} too large for the int16 per-row escape prefixes")
    base = best_window(exponent_histogram(w)) if w.numel() else 127

    bits = w.contiguous().view(torch.int16).to(torch.int32) & 0xFFFF
    exp = (bits >> 7) & 0xFF
    code = exp - base
    code = torch.where((code >= 0) & (code < ESCAPE), code, ESCAPE).to(torch.uint8)
    signman = (((bits >> 8) & 0x80) | (bits & 0x7F)).to(torch.uint8)
    del bits
    if (np_, kp) != (n, k):  # padding: code 0, signman 0 (never an escape)
        code = torch.nn.functional.pad(code, (0, kp - k, 0, np_ - n))
        signman = torch.nn.functional.pad(signman, (0, kp - k, 0, np_ - n))
        exp = torch.nn.functional.pad(exp, (0, kp - k, 0, np_ - n))

    quads = code.view(np_, kp // 4, 4) & 3
    code2 = quads[..., 0] | (quads[..., 1] << 2) | (quads[..., 2] << 4) | (quads[..., 3] << 6)
    highs = (code.view(np_, kp // 8, 8) >> 2) & 1
    code1 = torch.zeros_like(highs[..., 0])
    for i in range(8):
        code1 |= highs[..., i] << i

    # Escapes in row-major (row, k) order: entry = exponent << 8 | position in its k block; per-row start indices
    # and per-(row, k block) prefixes let a program find the escapes of any (row, k block) without a scan.
    is_esc = code == ESCAPE
    kpos = torch.arange(kp, device=w.device, dtype=torch.int32).expand(np_, kp)
    ent = (exp[is_esc].to(torch.int32) << 8) | (kpos[is_esc] % tk)
    esc = ent.to(torch.int16)  # wraps exponents >= 128 to negative int16; the kernel masks with 0xFFFF
    kb = kp // tk
    per_blk = is_esc.view(np_, kb, tk).sum(-1, dtype=torch.int32)
    blk = torch.zeros(np_, kb + 1, dtype=torch.int32, device=w.device)
    blk[:, 1:] = per_blk.cumsum(1)
    row_tot = blk[:, -1].to(torch.int64)
    esc_row = (row_tot.cumsum(0) - row_tot).to(torch.int32)
    if esc.numel() == 0:
        esc = torch.zeros(1, dtype=torch.int16, device=w.device)  # a kernel pointer must point somewhere
    return Packed(
        signman.contiguous(),
        code2.contiguous(),
        code1.contiguous(),
        esc.contiguous(),
        esc_row.contiguous(),
        blk.to(torch.int16).contiguous(),
        base,
        (n, k),
        tk,
    )


def unpack_codes(p: Packed) -> torch.Tensor:
    """The [Np, Kp] uint8 code tensor (0..7)."""
    np_, kp = p.signman.shape
    shifts2 = torch.arange(0, 8, 2, device=p.device, dtype=torch.uint8)
    lo = (p.code2.unsqueeze(-1) >> shifts2) & 3
    shifts1 = torch.arange(8, device=p.device, dtype=torch.uint8)
    hi = (p.code1.unsqueeze(-1) >> shifts1) & 1
    return lo.reshape(np_, kp) | (hi.reshape(np_, kp) << 2)


def escape_positions(p: Packed) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row, k, exponent) of every escape, from the side tables alone (the kernel's view), as int64/int32."""
    np_, kp = p.signman.shape
    kb = kp // p.tk
    blk = p.esc_blk.to(torch.int64) & 0xFFFF
    n_esc = int(blk[:, -1].sum())
    per_blk = (blk[:, 1:] - blk[:, :-1]).flatten()  # [Np * kb], row-major = the stream order
    cell = torch.repeat_interleave(torch.arange(np_ * kb, device=p.device), per_blk)
    ent = p.esc[:n_esc].to(torch.int32) & 0xFFFF
    rows, kblk = cell // kb, cell % kb
    return rows, kblk * p.tk + (ent & 0xFF).to(torch.int64), ent >> 8


def decode(p: Packed) -> torch.Tensor:
    """Pure-torch reference decode to the original bf16 [N, K] tensor (CPU or GPU). Escapes are patched at the
    positions the side tables give (as the kernel does), and those must be exactly the code-7 positions."""
    n, k = p.shape
    code = unpack_codes(p)
    exp = code.to(torch.int32) + p.base
    rows, ks, ex = escape_positions(p)
    mark = torch.zeros_like(code, dtype=torch.bool)
    mark[rows, ks] = True
    if not torch.equal(mark, code == ESCAPE) or int(mark.sum()) != rows.numel():
        raise ValueError("escape side tables disagree with the code plane")
    exp[rows, ks] = ex
    sm = p.signman.to(torch.int32)
    bits = ((sm & 0x80) << 8) | (exp << 7) | (sm & 0x7F)
    return bits[:n, :k].to(torch.int16).view(torch.bfloat16).contiguous()


def escape_count(p: Packed) -> int:
    """Escapes in the tensor (esc holds one dummy entry when there are none)."""
    return int((unpack_codes(p) == ESCAPE).sum())
