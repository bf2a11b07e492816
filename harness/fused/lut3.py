"""The lut3 weight format: bf16 weights laid out for a decode that runs inside a tensor-core GEMV.

Per bf16 weight: its sign+mantissa byte stored raw, and a 3-bit code. Codes 0..6 name the tensor's 7 most frequent
exponents (a 7-entry table); code 7 is an escape, whose exponent is taken from a per-tensor list of bytes. 11 bits per
weight plus 8 per escape; escapes are ~2% on normal weights, so ~11.2 bits (1.43x).

Layout. The kernel (lut3_kernel.cu) computes y = x @ W.T with `mma.m16n8k16` (bf16 in, fp32 accumulate): a warp owns
a tile of 16 rows and walks K in iterations of 64, four k-steps of 16. In one k-step each lane holds 8 weights of
the A fragment: rows g and g+8 (g = lane // 4), columns 2t, 2t+1, 2t+8, 2t+9 (t = lane % 4). The format stores
weights in exactly that order, so one lane's 32 weights of an iteration are 32 contiguous bytes of `signman` and 3
contiguous int32 code words, and a warp reads 1024 contiguous bytes per iteration (coalesced, no shuffles):

    stream position = ((tile * iters + iteration) * 32 + lane) * 32 + j,   j = 8 * step + i
    element i of a k-step (PTX's A fragment order): row g + 8 * ((i >> 1) & 1), column 2t + (i & 1) + 8 * (i >> 2)

Code words of one (tile, iteration, lane), nibble n = bits 4n..4n+3:
    W0: bits 0-2 of nibble n = code of j = n;       bit 3 = bit 0 of the code of j = 24 + n
    W1: bits 0-2 of nibble n = code of j = 8 + n;   bit 3 = bit 1 of the code of j = 24 + n
    W2: bits 0-2 of nibble n = code of j = 16 + n;  bit 3 = bit 2 of the code of j = 24 + n
so three masks give PRMT selectors for j = 0..23 and a few shifts those of j = 24..31. A code indexes one byte table
with one PRMT per 4 weights. Its bytes, and the escape list's, hold each exponent rotated right by one bit,
rot(e) = [e0 e7 e6 e5 e4 e3 e2 e1] (0 for code 7): the bf16's high byte is [s e7..e1] and its low byte [e0 m6..m0],
so both come from one looked-up byte by masks alone, the escape's bytes OR-ed in before, with no shifts.

Escapes: the list holds their exponents ordered by (tile, iteration, lane, j); `esc_off[tile * iters + iteration]` is
where the escapes of that (tile, iteration) start, so a warp can start at any iteration (split-K), and a lane finds
its own from a prefix count over the lanes before it. The kernel decodes every weight exactly in its main pass: a
lane takes an 8-byte window of the list at its first escape (byte 7 forced to 0), and per 4 weights one more PRMT,
whose selector is each escape's rank among the lane's escapes (7, the zero byte, for the others), gives the escape
exponents' (rotated) bytes, OR-ed into the table's (which are 0 for code 7). A lane with more than 7 escapes in one
iteration (about 4e-7 of lanes on normal weights) reads them byte by byte instead.

Everything here is torch (CPU or GPU, the same code): `encode`, `decode` (the reference inverse), `nbytes`, and
`emulate_decode`, which runs the kernel's bit operations (PRMT table lookups, byte assembly) elementwise so the CPU
tests check the kernel's decode logic, not only the format.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def rot(e):
    """An exponent byte rotated right by one bit, [e0 e7..e1], as the table and the escape list store it (an int
    or an integer tensor)."""
    return ((e >> 1) | ((e & 1) << 7)) & 0xFF


def unrot(b):
    """The inverse of `rot`."""
    return ((b << 1) | (b >> 7)) & 0xFF


TILE_ROWS = 16
ITER_K = 64  # k per iteration: 4 mma k-steps of 16
LANE_WEIGHTS = 32  # weights per lane per iteration
ESCAPE = 7
ESC_PAD = 16  # bytes after the escape list: the kernel reads 12 aligned bytes around each lane's 8-byte window
WINDOW = 7  # escapes per lane and iteration that the kernel takes from its window (byte 7 is the zero byte)


@dataclass
class Lut3:
    """One weight matrix in lut3 form (tensors on one device)."""

    shape: tuple[int, int]  # (N, K) of the original weight
    signman: torch.Tensor  # uint8 [tiles * iters * 32 * 32], stream order
    codes: torch.Tensor  # int32 [3, tiles * iters * 32]
    esc_exp: torch.Tensor  # uint8 [n_escapes + ESC_PAD]
    esc_off: torch.Tensor  # int32 [tiles * iters + 1]
    exponents: tuple[int, ...]  # 7 biased exponents, code c -> exponents[c]

    @property
    def tiles(self) -> int:
        return -(-self.shape[0] // TILE_ROWS)

    @property
    def iters(self) -> int:
        return self.shape[1] // ITER_K

    @property
    def device(self) -> torch.device:
        return self.signman.device

    @property
    def n_escapes(self) -> int:
        return int(self.esc_off[-1])

    def nbytes(self) -> int:
        """Every byte stored: planes, escape list, offsets, and the 7-byte table."""
        tensors = (self.signman, self.codes, self.esc_exp, self.esc_off)
        return sum(t.numel() * t.element_size() for t in tensors) + len(self.exponents)

    def lut_words(self) -> tuple[int, int]:
        """(t0, t1): the table of rotated exponents as PRMT source words (code c is byte c of t0:t1; code 7's is 0)."""
        b = [rot(e) for e in self.exponents] + [0]

        def word(v4: list[int]) -> int:
            v = v4[0] | v4[1] << 8 | v4[2] << 16 | v4[3] << 24
            return v - (1 << 32) if v >= 1 << 31 else v  # as a C int32

        return word(b[:4]), word(b[4:])

    def to(self, device: torch.device | str) -> Lut3:
        return Lut3(self.shape, self.signman.to(device), self.codes.to(device), self.esc_exp.to(device),
                    self.esc_off.to(device), self.exponents)  # fmt: skip


def supported(shape: tuple[int, ...], dtype: torch.dtype) -> str | None:
    """None if a weight of this shape and dtype can be stored as lut3, else why not (one line)."""
    if dtype != torch.bfloat16:
        return f"lut3 stores bfloat16 weights only (got {dtype})"
    if len(shape) != 2:
        return f"lut3 stores 2-D weights only (got shape {tuple(shape)})"
    if shape[1] % ITER_K:
        return f"lut3 needs in_features divisible by {ITER_K} (got {shape[1]})"
    return None


def _stream_view(w: torch.Tensor, tiles: int, iters: int) -> torch.Tensor:
    """[tiles*16, iters*64] -> stream order [tiles, iters, 32 lanes, 32 j] (see the module docstring)."""
    v = w.reshape(tiles, 2, 8, iters, 4, 2, 4, 2)  # tile, rh, g, it, step, hi, t, lb
    return v.permute(0, 3, 2, 6, 4, 5, 1, 7).reshape(tiles, iters, 32, 32)  # tile, it, (g, t), (step, hi, rh, lb)


def _unstream(s: torch.Tensor, tiles: int, iters: int) -> torch.Tensor:
    v = s.reshape(tiles, iters, 8, 4, 4, 2, 2, 2)  # tile, it, g, t, step, hi, rh, lb
    return v.permute(0, 6, 2, 1, 4, 5, 3, 7).reshape(tiles * TILE_ROWS, iters * ITER_K)


def encode(weight: torch.Tensor) -> Lut3:
    """Encode a 2-D bf16 weight (on any device; stays there). Raises ValueError if unsupported."""
    why = supported(tuple(weight.shape), weight.dtype)
    if why:
        raise ValueError(why)
    n, k = weight.shape
    tiles, iters = -(-n // TILE_ROWS), k // ITER_K
    dev = weight.device
    bits = weight.detach().contiguous().view(torch.int16).to(torch.int32) & 0xFFFF
    if tiles * TILE_ROWS != n:  # padding rows: sign/mantissa 0, code 0; computed by the kernel, never stored
        bits = torch.cat([bits, bits.new_zeros(tiles * TILE_ROWS - n, k)])
    exp = (bits >> 7) & 0xFF
    counts = torch.bincount(exp[:n].reshape(-1), minlength=256)
    # 7 most frequent exponents; ties go to the smaller exponent (stable, deterministic)
    order = torch.argsort(-counts.to(torch.int64) * 256 + torch.arange(256, device=dev), stable=True)
    top = [int(e) for e in order[:7].tolist()]
    code_of = torch.full((256,), ESCAPE, dtype=torch.int32, device=dev)
    code_of[torch.tensor(top, device=dev)] = torch.arange(7, dtype=torch.int32, device=dev)
    code = code_of[exp]
    code[n:] = 0  # padding rows never escape
    sm = (((bits >> 8) & 0x80) | (bits & 0x7F)).to(torch.uint8)

    sm_s = _stream_view(sm, tiles, iters)
    code_s = _stream_view(code, tiles, iters).to(torch.int64)  # [T, I, 32, 32]
    exp_s = _stream_view(exp, tiles, iters)
    nib = torch.arange(8, device=dev, dtype=torch.int64) * 4
    words = []
    for p in range(3):
        direct = (code_s[..., 8 * p : 8 * p + 8] << nib).sum(-1)
        spare = (((code_s[..., 24:32] >> p) & 1) << (nib + 3)).sum(-1)
        w = direct | spare
        words.append(torch.where(w >= 1 << 31, w - (1 << 32), w).to(torch.int32))
    codes = torch.stack(words).reshape(3, tiles * iters * 32)

    esc_mask = code_s == ESCAPE  # [T, I, 32 lanes, 32 j]: the list's order is this tensor's
    esc_exp = torch.cat([rot(exp_s[esc_mask].to(torch.int32)).to(torch.uint8),
                         torch.zeros(ESC_PAD, dtype=torch.uint8, device=dev)])
    per_iter = esc_mask.reshape(tiles * iters, -1).sum(-1, dtype=torch.int64)
    esc_off = torch.zeros(tiles * iters + 1, dtype=torch.int64, device=dev)
    esc_off[1:] = torch.cumsum(per_iter, 0)
    if int(esc_off[-1]) >= 1 << 31:
        raise ValueError("lut3: more than 2^31 escapes in one tensor")
    return Lut3((n, k), sm_s.reshape(-1).contiguous(), codes.contiguous(), esc_exp.contiguous(),
                esc_off.to(torch.int32), tuple(top))  # fmt: skip


def _codes_per_weight(p: Lut3) -> torch.Tensor:
    """[T, I, 32, 32] int64 codes from the three words."""
    w = p.codes.to(torch.int64).reshape(3, p.tiles, p.iters, 32, 1) & 0xFFFFFFFF
    nib = torch.arange(8, device=p.device, dtype=torch.int64) * 4
    direct = [(w[q] >> nib) & 7 for q in range(3)]
    last = sum((((w[q] >> (nib + 3)) & 1) << q) for q in range(3))
    return torch.cat(direct + [last], dim=-1)


def decode(p: Lut3) -> torch.Tensor:
    """The reference inverse of `encode`: the original bf16 weight, bit for bit."""
    code = _codes_per_weight(p)
    table = torch.tensor(list(p.exponents) + [0], dtype=torch.int64, device=p.device)
    exp = table[code]
    exp[code == ESCAPE] = unrot(p.esc_exp[: p.n_escapes].to(torch.int64))
    sm = p.signman.to(torch.int64).reshape(p.tiles, p.iters, 32, 32)
    bits = ((sm & 0x80) << 8) | (exp << 7) | (sm & 0x7F)
    bits = torch.where(bits >= 1 << 15, bits - (1 << 16), bits).to(torch.int16)
    return _unstream(bits, p.tiles, p.iters)[: p.shape[0]].contiguous().view(torch.bfloat16)


# ---- the kernel's bit operations, emulated (tests check lut3_kernel.cu's decode logic on the CPU) ----


def prmt(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | int) -> torch.Tensor:
    """PTX prmt.b32 (default mode) on int64 tensors holding uint32 values: output byte i is source byte
    (c >> 4i) & 7 of {b:a}, or that byte's sign replicated when bit 3 of the selector nibble is set."""
    c = torch.as_tensor(c, dtype=torch.int64, device=a.device)
    src = (b.to(torch.int64) << 32) | (a.to(torch.int64) & 0xFFFFFFFF)
    out = torch.zeros_like(src)
    for i in range(4):
        sel = (c >> (4 * i)) & 0xF
        byte = (src >> ((sel & 7) * 8)) & 0xFF
        byte = torch.where((sel & 8) != 0, torch.where((byte & 0x80) != 0, 0xFF, 0), byte)
        out |= byte << (8 * i)
    return out


def _popc(v: torch.Tensor) -> torch.Tensor:
    """Bits set per element of an int64 tensor holding uint32 values."""
    v = v - ((v >> 1) & 0x55555555)
    v = (v & 0x33333333) + ((v >> 2) & 0x33333333)
    v = (v + (v >> 4)) & 0x0F0F0F0F
    return ((v * 0x01010101) & 0xFFFFFFFF) >> 24


def escape_flags(w0: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> list[torch.Tensor]:
    """The kernel's `flags_of`: per group g of 8 weights (j = 8g + i), nibble i is 1 where j escapes (code 7)."""
    t3 = w0 & w1 & w2
    return [w0 & (w0 >> 1) & (w0 >> 2) & 0x11111111, w1 & (w1 >> 1) & (w1 >> 2) & 0x11111111,
            w2 & (w2 >> 1) & (w2 >> 2) & 0x11111111, (t3 >> 3) & 0x11111111]  # fmt: skip


CHUNK_WORDS = 32  # words of the escape list a warp of the CHUNK kernels loads per iteration (one per lane)


def chunk_windows(p: Lut3, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The windows (lo, hi words) as the CHUNK kernels (lut3_gemvc*) fetch them, for lanes whose first escape is at
    `pos` [T, I, 32]: lane L of the warp holds word (cb / 4) + L of the list, cb = the iteration's offset (0 past the
    padded list's end), and a lane takes words wi..wi+2 from the lanes holding them (wi = pos / 4 - cb / 4), or
    loads its own window when wi > 29. Also returns where a lane loads its own (the fallback), for the tests."""
    m32 = 0xFFFFFFFF
    ex = p.esc_exp.to(torch.int64)
    words = (p.n_escapes + ESC_PAD) >> 2  # the kernel's bound, from esc_off's last entry
    wl = ex[: 4 * words].reshape(words, 4)
    list_words = wl[:, 0] | wl[:, 1] << 8 | wl[:, 2] << 16 | wl[:, 3] << 24
    cb = p.esc_off[:-1].to(torch.int64).reshape(p.tiles, p.iters, 1)
    index = (cb >> 2) + torch.arange(CHUNK_WORDS)  # [T, I, 32]: the word each lane loads
    chunk = torch.where(index < words, list_words[index.clamp(max=words - 1)], 0)
    wi = (pos >> 2) - (cb >> 2)
    x0, x1, x2 = (torch.gather(chunk, -1, (wi + d) % CHUNK_WORDS) for d in range(3))  # shuffles wrap past lane 31
    sh = (pos & 3) * 8
    lo = ((x1 << 32 | x0) >> sh) & m32
    hi = ((x2 << 32 | x1) >> sh) & 0x00FFFFFF
    own = wi > CHUNK_WORDS - 3
    win = [ex[pos + b] for b in range(WINDOW)]  # window_of: the lane's own loads
    own_lo = win[0] | win[1] << 8 | win[2] << 16 | win[3] << 24
    own_hi = win[4] | win[5] << 8 | win[6] << 16
    return torch.where(own, own_lo, lo), torch.where(own, own_hi, hi), own


def emulate_decode(p: Lut3, chunk: bool = False) -> torch.Tensor:
    """The weights as the kernel's main pass decodes them, from the same operations as the CUDA code (PRMT table
    lookups, escape flags, the lane prefix count, the window and its rank selectors, byte assembly), elementwise:
    bf16 bits int16 [T, I, 32, 32] in stream order. The tests compare it with W. `chunk`: the windows as the
    lut3_gemvc* kernels fetch them (`chunk_windows`), else as lut3_gemv* do (each lane's own loads)."""
    m32 = 0xFFFFFFFF
    t0, t1 = (v & m32 for v in p.lut_words())
    w = p.codes.to(torch.int64).reshape(3, p.tiles, p.iters, 32) & m32
    w0, w1, w2 = w[0], w[1], w[2]
    m7 = 0x77777777
    s3 = ((w0 >> 3) & 0x11111111) | ((w1 >> 2) & 0x22222222) | ((w2 >> 1) & 0x44444444)
    sels = []
    for s in (w0 & m7, w1 & m7, w2 & m7, s3):
        sels += [s & 0xFFFF, s >> 16]
    flags = escape_flags(w0, w1, w2)
    count = sum(_popc(f) for f in flags)  # [T, I, 32]
    # each lane's first escape: the (tile, iteration) offset plus the lanes before it (the kernel's warp scan)
    pos = p.esc_off[:-1].to(torch.int64).reshape(p.tiles, p.iters, 1) + torch.cumsum(count, -1) - count
    ex = p.esc_exp.to(torch.int64)
    if chunk:
        wlo, whi, _ = chunk_windows(p, pos)
    else:
        win = [ex[pos + b] for b in range(WINDOW)]  # the window's bytes 0..6 (byte 7 is 0)
        wlo = win[0] | win[1] << 8 | win[2] << 16 | win[3] << 24
        whi = win[4] | win[5] << 8 | win[6] << 16
    rare = count > WINDOW
    sm = p.signman.to(torch.int64).reshape(p.tiles, p.iters, 32, 8, 4)
    smw = sm[..., 0] | sm[..., 1] << 8 | sm[..., 2] << 16 | sm[..., 3] << 24  # 8 words of 4 weights
    pairs, base = [], torch.zeros_like(count)
    for g in range(4):
        nf = flags[g]
        r = (nf * 0x11111110 + base * 0x11111111) & m32  # nibble i: rank of j = 8g + i among the lane's escapes
        es = m7 ^ ((r ^ m7) & (nf * 7))  # escapes: their rank; the others: 7, the window's zero byte
        for h in range(2):
            e_word = prmt(wlo, whi, (es >> (16 * h)) & 0xFFFF)
            if bool(rare.any()):  # the kernel's byte-by-byte path for lanes with more escapes than the window
                slow, rank = torch.zeros_like(e_word), base + (_popc(nf & 0xFFFF) if h else 0)
                for i in range(4):
                    f = (nf >> (4 * (4 * h + i))) & 1
                    slow |= torch.where(f == 1, ex[(pos + rank).clamp(max=ex.numel() - 1)], 0) << (8 * i)
                    rank = rank + f
                e_word = torch.where(rare, slow, e_word)
            q = 2 * g + h
            tb = prmt(torch.full_like(sels[q], t0), torch.full_like(sels[q], t1), sels[q]) | e_word  # rot(exponent)
            word = smw[..., q]
            hi = (tb & 0x7F7F7F7F) | (word & 0x80808080)  # [s e7..e1] per byte
            lo = (tb & 0x80808080) | (word & 0x7F7F7F7F)  # [e0 m6..m0] per byte
            pairs += [prmt(lo, hi, 0x5140), prmt(lo, hi, 0x7362)]  # bf16x2 (j+1 | j), (j+3 | j+2)
        base = base + _popc(nf)
    bits = []
    for v in pairs:
        bits += [v & 0xFFFF, v >> 16]
    out = torch.stack(bits, dim=-1)
    return torch.where(out >= 1 << 15, out - (1 << 16), out).to(torch.int16)
