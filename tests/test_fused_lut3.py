"""The lut3 format (harness/fused/lut3.py) and the kernel's decode logic, on the CPU.

The CUDA kernel cannot run here; `emulate_decode` performs its bit operations (PRMT table lookups, byte assembly,
escape masks) elementwise, so these tests fail if the kernel's decode would. tests/test_gpu.py runs the kernel.
"""

from __future__ import annotations

import pytest
import torch

from harness.fused import lut3


def _normal(n: int, k: int, seed: int = 0, std: float = 0.02) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, generator=g) * std).to(torch.bfloat16)


def _bits(w: torch.Tensor) -> torch.Tensor:
    return w.view(torch.int16)


def _kernel_decode(p: lut3.Lut3, chunk: bool = False) -> torch.Tensor:
    """The kernel's whole decode, emulated (escapes included: windows, rank selectors, the byte-by-byte path);
    `chunk`: the windows fetched as the lut3_gemvc* kernels do."""
    return lut3._unstream(lut3.emulate_decode(p, chunk=chunk), p.tiles, p.iters)[: p.shape[0]].contiguous()


@pytest.mark.parametrize("shape", [(16, 64), (40, 128), (100, 576), (33, 192)])
def test_round_trip_and_kernel_decode_are_bit_exact(shape):
    w = _normal(*shape, seed=shape[0])
    p = lut3.encode(w)
    assert torch.equal(_bits(lut3.decode(p)), _bits(w))
    assert torch.equal(_kernel_decode(p), _bits(w))
    assert torch.equal(_kernel_decode(p, chunk=True), _bits(w))


def _lane_positions(p: lut3.Lut3) -> torch.Tensor:
    c = p.codes.to(torch.int64).reshape(3, p.tiles, p.iters, 32) & 0xFFFFFFFF
    count = sum(lut3._popc(f) for f in lut3.escape_flags(c[0], c[1], c[2]))
    return p.esc_off[:-1].to(torch.int64).reshape(p.tiles, p.iters, 1) + torch.cumsum(count, -1) - count


@pytest.mark.parametrize("spread", [0, 4, 10])
def test_warp_fetched_windows_equal_each_lanes_own(spread):
    """The lut3_gemvc* kernels' windows (one word per lane from the iteration's offset, then shuffles) hold the same
    bytes as a lane's own loads, where they come from the chunk and where the lane falls back (escape-dense
    iterations); the last iterations' chunks run past the list's end, where the words read as 0."""
    w = _normal(64, 512, seed=11 + spread)
    if spread:  # exponents over 2 x spread values: many escapes per iteration
        g = torch.Generator().manual_seed(spread)
        w = (w.float() * torch.exp2(torch.randint(-spread, spread, w.shape, generator=g).float())).to(torch.bfloat16)
    p = lut3.encode(w)
    pos = _lane_positions(p)
    lo, hi, own = lut3.chunk_windows(p, pos)
    ex = p.esc_exp.to(torch.int64)
    want_lo = sum(ex[pos + b] << (8 * b) for b in range(4))
    want_hi = sum(ex[pos + 4 + b] << (8 * b) for b in range(3))
    assert torch.equal(lo, want_lo) and torch.equal(hi, want_hi)
    if spread:  # escape-dense: both paths in one tensor
        assert bool(own.any()) and not bool(own.all())
    else:
        assert not bool(own.any())
        last_cb = int(p.esc_off[-2])  # the last chunk runs past the list: the guard's zero words are read
        assert (last_cb >> 2) + lut3.CHUNK_WORDS > (p.n_escapes + lut3.ESC_PAD) >> 2
    assert torch.equal(_kernel_decode(p, chunk=True), _bits(w))


def test_every_bf16_bit_pattern_survives():
    """All 65536 patterns (both zeros, subnormals, infinities, NaN payloads) in one tensor, amid normal weights so
    that most patterns are escapes."""
    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).reshape(256, 256)
    w = torch.cat([every, _normal(256, 256, seed=1)], dim=0)
    p = lut3.encode(w)
    assert torch.equal(_bits(lut3.decode(p)), _bits(w))
    assert torch.equal(_kernel_decode(p)[:64], _bits(w)[:64])  # the slow emulation on a slice of rows


def test_escape_flags_and_offsets_count_every_escape():
    """The kernel's escape flags find exactly the weights outside the table, and each (tile, iteration)'s offset
    moves by the escapes its lanes count, which is what the warp scan adds up."""
    w = _normal(48, 256, seed=3)
    p = lut3.encode(w)
    c = p.codes.to(torch.int64).reshape(3, p.tiles, p.iters, 32) & 0xFFFFFFFF
    count = sum(lut3._popc(f) for f in lut3.escape_flags(c[0], c[1], c[2]))
    escaped = ~torch.isin((_bits(w).to(torch.int32) >> 7) & 0xFF, torch.tensor(p.exponents))
    assert int(count.sum()) == int(escaped.sum()) == p.n_escapes
    assert torch.equal(count.sum(-1).reshape(-1), (p.esc_off[1:] - p.esc_off[:-1]).to(torch.int64))


def test_lanes_with_more_escapes_than_the_window_decode_exactly():
    """A lane with 8 or more escapes in one iteration takes the byte-by-byte path; both paths in one tensor."""
    w = _normal(32, 128, seed=7)
    bits = w.view(torch.int16).clone()
    bits[0, :64] = (bits[0, :64] & ~(0xFF << 7)) | (0x20 << 7)  # a rare exponent over a whole row's first block
    w = bits.view(torch.bfloat16)
    p = lut3.encode(w)
    c = p.codes.to(torch.int64).reshape(3, p.tiles, p.iters, 32) & 0xFFFFFFFF
    count = sum(lut3._popc(f) for f in lut3.escape_flags(c[0], c[1], c[2]))
    assert int(count.max()) > lut3.WINDOW and int((count <= lut3.WINDOW).sum()) > 0
    assert torch.equal(_kernel_decode(p), _bits(w))
    assert torch.equal(_kernel_decode(p, chunk=True), _bits(w))


def test_reference_inputs_are_the_weight_in_the_kernel_order():
    """The exactness reference is built from W alone: W's own bits, in the order the kernel's lanes read them."""
    from harness.fused import lut3_cuda

    w = _normal(40, 128, seed=4)
    p = lut3.encode(w)
    ref = lut3_cuda.reference_inputs(w)
    assert (ref.tiles, ref.iters) == (p.tiles, p.iters)
    assert torch.equal(lut3._unstream(ref.raw.reshape(p.tiles, p.iters, 32, 32), p.tiles, p.iters)[:40], _bits(w))


def test_ratio_on_normal_weights():
    """11 bits per weight plus 8 per escape (~2% on normal(0, 0.02)): about 1.43x on an 8B-shaped block."""
    w = _normal(1024, 4096, seed=5)
    p = lut3.encode(w)
    ratio = w.numel() * 2 / p.nbytes()
    assert 1.40 <= ratio <= 16 / 11
    assert 0.015 < p.n_escapes / w.numel() < 0.03


def test_table_holds_the_seven_most_frequent_exponents():
    w = _normal(64, 512, seed=6)
    p = lut3.encode(w)
    counts = torch.bincount(((_bits(w).to(torch.int32) >> 7) & 0xFF).reshape(-1), minlength=256)
    assert sorted(counts[list(p.exponents)].tolist()) == sorted(counts.topk(7).values.tolist())


@pytest.mark.parametrize(
    ("shape", "dtype", "message"),
    [
        ((16, 64), torch.float16, "bfloat16"),
        ((16, 60), torch.bfloat16, "divisible by 64"),
        ((64,), torch.bfloat16, "2-D"),
    ],
)
def test_unsupported_weights_are_refused_with_the_reason(shape, dtype, message):
    w = torch.zeros(shape, dtype=dtype)
    assert message in lut3.supported(tuple(w.shape), w.dtype)
    with pytest.raises(ValueError, match=message):
        lut3.encode(w)


def test_prmt_matches_ptx_semantics():
    a, b = torch.tensor([0x44332211]), torch.tensor([0x88776655])
    assert int(lut3.prmt(a, b, 0x3210)) == 0x44332211
    assert int(lut3.prmt(a, b, 0x7654)) == 0x88776655
    assert int(lut3.prmt(a, b, 0x5140)) == 0x66225511
    assert int(lut3.prmt(a, b, 0x000F)) == 0x111111FF  # bit 3 set: the sign of byte 7 (0x88) replicated


def test_launches_pick_the_build_and_shared_memory_for_their_tokens():
    """Decode steps (<= 8 tokens) take the family's build at the next template; 9-32 tokens the wide build (lane's
    only) at 16, 24 or 32, with one 8-token group of partial sums per 8 tokens; more than 32 is refused."""
    from harness.fused import lut3_cuda

    assert [lut3_cuda._template(m) for m in (1, 2, 3, 8, 9, 16, 17, 24, 25, 32)] == [1, 2, 4, 8, 16, 16, 24, 24, 32, 32]
    with pytest.raises(ValueError, match="33 tokens > 32"):
        lut3_cuda._template(33)
    assert [lut3_cuda.fused_kernel(m, "chunk") for m in (1, 4, 9, 32)] == ["lut3_gemvc", "lut3_gemvc72", "lut3_gemv",
                                                                           "lut3_gemv"]  # fmt: skip
    assert [lut3_cuda.fused_kernel(m, "ballot") for m in (1, 4, 9)] == ["lut3_gemvb", "lut3_gemvb72", "lut3_gemvb"]
    one = lut3_cuda.SMEM_PER_WARP_BYTES
    assert [lut3_cuda.shared_bytes(f"lut3_gemv_m{t}", 4) for t in (1, 8, 16, 24, 32)] == [4 * one * g
                                                                                       for g in (1, 1, 2, 3, 4)]  # fmt: skip
    assert lut3_cuda.shared_bytes("lut3_ref_m32", 16) <= 48 * 1024  # within the default dynamic shared memory
    assert {f"lut3_{v}_m{t}" for v in ("gemv", "gemvb", "ref") for t in (16, 24, 32)} <= set(lut3_cuda._NAMES)
