"""The exp3 format (harness/fused): bit-exact round trips, layout invariants, the ratio, and (interpreted) the kernel."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import RunIf

from harness.fused.format import (
    ESCAPE,
    choose_tk,
    decode,
    encode,
    escape_count,
    escape_positions,
    exponent_histogram,
    unpack_codes,
)


def normal(n, k, seed=0, std=0.02):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, generator=g) * std).to(torch.bfloat16)


def assert_roundtrip(w, **kw):
    p = encode(w, **kw)
    out = decode(p)
    assert out.shape == w.shape and out.dtype == torch.bfloat16
    assert torch.equal(out.view(torch.int16), w.view(torch.int16))
    return p


@pytest.mark.parametrize("shape", [(64, 512), (48, 1100), (17, 3), (1, 1), (1, 7), (3, 513), (130, 1024)])
def test_normal_roundtrip(shape):
    assert_roundtrip(normal(*shape))


def test_every_bit_pattern_roundtrips():
    # All 65536 bf16 patterns: every exponent, +-0, subnormals, +-inf, every NaN payload; shuffled so escapes
    # land in every row and k block.
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    bits = bits[torch.randperm(bits.numel(), generator=torch.Generator().manual_seed(1))]
    w = bits.view(torch.bfloat16).view(256, 256)
    p = assert_roundtrip(w, tk=64)
    assert escape_count(p) > 256 * 256 * 0.9  # 7 of 256 exponents fit the window
    assert_roundtrip(w.reshape(128, 512))


def test_specials_and_tails_in_normal_weights():
    w = normal(40, 700)
    w[0, :6] = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0, 0.0, 1e-40])
    w[5, 100] = 3e38
    w[39, 699] = -1e-38
    p = assert_roundtrip(w)
    assert escape_count(p) >= 8


def test_all_escapes_and_no_escapes():
    # Four exponents far apart: a 7-wide window holds one of them, so 3 in 4 weights escape.
    spread = torch.tensor([1e-30, -1e30, 1e20, 1e-20], dtype=torch.bfloat16).repeat(16, 32)
    p = assert_roundtrip(spread, tk=64)
    assert escape_count(p) == spread.numel() * 3 // 4
    ones = torch.ones(16, 64, dtype=torch.bfloat16)
    p = assert_roundtrip(ones, tk=64)
    assert escape_count(p) == 0 and p.esc.numel() == 1  # the dummy byte


def test_layout_invariants():
    w = normal(100, 1500, seed=3)
    p = encode(w, tk=256)
    np_, kp = p.signman.shape
    assert (np_, kp) == (112, 1536) and p.code2.shape == (112, 384) and p.code1.shape == (112, 192)
    assert p.esc_row.shape == (112,) and p.esc_blk.shape == (112, kp // 256 + 1) and p.esc.dtype == torch.int16
    code = unpack_codes(p)
    assert int(code[100:].max()) == 0 and int(code[:, 1500:].max()) == 0  # padding never escapes
    is_esc = code == ESCAPE
    blk = p.esc_blk.long()
    # per-(row, k block) prefixes and row starts match a recount; entries sit at the code-7 positions
    per = is_esc.view(np_, kp // 256, 256).sum(-1)
    assert torch.equal(blk[:, 1:] - blk[:, :-1], per) and bool((blk[:, 0] == 0).all())
    tot = is_esc.sum(1)
    assert torch.equal(p.esc_row.long(), tot.cumsum(0) - tot)
    rows, ks, ex = escape_positions(p)
    assert torch.equal(torch.stack([rows, ks]), is_esc.nonzero().T)
    assert torch.equal(ex.long(), ((w.view(torch.int16)[rows, ks].long() >> 7) & 0xFF))
    tensors = (p.signman, p.code2, p.code1, p.esc, p.esc_row, p.esc_blk)
    assert p.nbytes == 16 + sum(t.numel() * t.element_size() for t in tensors)


def test_ratio_and_escape_rate_on_normal_weights():
    # Measured here: 1.4018x at 4096x4096 (11.41 b/w: 11 + 16 x 2.12% escapes + 0.07 tables); escapes are the small
    # tail |w| < 2^-11.
    w = normal(1024, 4096, seed=7)
    p = encode(w)
    assert p.ratio >= 1.40
    assert 0.015 < escape_count(p) / w.numel() < 0.03
    hist = exponent_histogram(w)
    assert int(hist[p.base : p.base + ESCAPE].sum()) == w.numel() - escape_count(p)


def test_k_block_follows_k():
    assert [choose_tk(k) for k in (4096, 14336, 576, 1100, 1)] == [256, 256, 64, 128, 64]
    p = encode(normal(64, 576))  # SmolLM2's hidden size: a 256 block would pad 576 to 768
    assert p.tk == 64 and p.signman.shape == (64, 576) and p.ratio >= 1.36  # 1.369: the 16-bit prefix per 64-weight block costs 0.25 b/w


def test_encode_rejects_wrong_input():
    with pytest.raises(ValueError, match="bfloat16"):
        encode(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="64, 128 or 256"):
        encode(torch.zeros(4, 4, dtype=torch.bfloat16), tk=100)


# ---------------------------------------------------------------- the kernel, in Triton's CPU interpreter


# The interpreter must be switched on before triton is first imported (torch imports it), so these tests run in a
# child pytest with TRITON_INTERPRET=1; in this process they skip, and test_kernel_in_interpreter starts the child.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@RunIf(no_cuda=True, packages=["triton"])  # with a GPU, bench/fused_kernel.py checks the compiled kernel
def test_kernel_in_interpreter():
    if INTERPRETED:
        pytest.skip("this is the child run")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "interpreted"]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout, done.stdout[-2000:]


@pytest.fixture(scope="module")
def kernel():
    if not INTERPRETED:
        pytest.skip("runs in the TRITON_INTERPRET=1 child of test_kernel_in_interpreter")
    pytest.importorskip("triton")
    import harness.fused.kernel as kernel

    assert kernel.INTERPRET
    return kernel


@pytest.mark.parametrize(
    ("n", "k", "m", "bn", "split", "tk", "e"),
    [
        (32, 512, 1, 16, 1, None, 16),
        (48, 1100, 3, 32, 1, None, 8),  # K padded, rows padded past Np (bn 32 > 48 - 32)
        (40, 1024, 8, 8, 2, None, 16),
        (16, 512, 2, 4, 4, 128, 8),
        (20, 512, 17, 16, 1, 64, 16),  # M > 8: two m blocks
    ],
)
def test_interpreted_kernel_equals_reference_variant(kernel, n, k, m, bn, split, tk, e):
    w = normal(n, k, seed=n + k)
    w[1, :4] = torch.tensor([1e-30, 0.0, -0.0, 2.5e3])  # escapes on both sides of the window
    w[2, :40] = -1e-30  # more escapes in one (row, k block) than E slots: the overflow pass
    w[3, 5:9] = torch.tensor([float("inf"), 3e38, -1e-38, 1e-40])
    x = normal(m, k, seed=m, std=1.0)
    p = encode(w, tk=tk)
    cfg = kernel.Config(block_n=bn, num_warps=4, split=split, block_e=e)
    fused = kernel.launch(x, None, p, cfg, True)
    ref = kernel.launch(x, w, p, cfg, False)
    assert torch.equal(fused.view(torch.int16), ref.view(torch.int16))
    w[3, 5] = 0.0  # the inf makes one output column inf in both; compare the rest against float64
    exact = x.double() @ w.double().T
    keep = torch.ones(n, dtype=torch.bool)
    keep[3] = False
    assert not bool(torch.isfinite(fused[:, 3]).any())  # inf (or nan where 3e38 overflowed the other way)
    err = (fused.double()[:, keep] - exact[:, keep]).norm() / exact[:, keep].norm()
    assert float(err) < 1e-2


def test_interpreted_tile_decode_is_exact(kernel):
    w = normal(40, 700, seed=11)
    w[0, :6] = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0, 0.0, 1e-40])
    p = encode(w)
    assert torch.equal(kernel.decode_gpu(p).view(torch.int16), w.view(torch.int16))


def test_interpreted_torch_ops_take_leading_dims(kernel):
    w = normal(64, 512, seed=5)
    x = normal(6, 512, seed=6, std=1.0).view(2, 3, 512)
    p = encode(w)
    y = kernel.fused_linear(x, p)
    assert y.shape == (2, 3, 64)
    assert torch.equal(y.view(torch.int16), kernel.reference_linear(x, w, p).view(torch.int16))
    exact = x.double() @ w.double().T
    assert float((y.double() - exact).norm() / exact.norm()) < 1e-2
