"""The exp3 format (harness/fused): bit-exact round trips, layout invariants, the ratio, and (interpreted) the kernel."""

import os
import subprocess
import sys

import pytest
import torch

from harness.fused.format import (
    ESCAPE,
    ROW_GROUP,
    choose_tk,
    decode,
    encode,
    escape_count,
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
    assert p.esc_off.shape == (kp // 256, np_ // ROW_GROUP) and p.esc_off.dtype == torch.int32
    off = p.esc_off.flatten().long()
    assert off[0] == 0 and bool((off[1:] >= off[:-1]).all()) and int(off[-1]) <= p.esc.numel()
    code = unpack_codes(p)
    assert int(code[100:].max()) == 0 and int(code[:, 1500:].max()) == 0  # padding never escapes
    # The escapes of (k block 2, row group 3) start at its offset: recount them in the stream order.
    counts = (code == ESCAPE).view(np_, kp // 256, 256).transpose(0, 1).reshape(-1, ROW_GROUP * 256).sum(1)
    assert int(off[2 * (np_ // ROW_GROUP) + 3]) == int(counts[: 2 * (np_ // ROW_GROUP) + 3].sum())
    tensors = (p.signman, p.code2, p.code1, p.esc, p.esc_off)
    assert p.nbytes == 16 + sum(t.numel() * t.element_size() for t in tensors)


def test_ratio_and_escape_rate_on_normal_weights():
    # Measured here: 1.4319x at 4096x4096 and 1.4313x at 1024x4096; escapes 2.13% (|w| < 2^-11, the small tail).
    w = normal(1024, 4096, seed=7)
    p = encode(w)
    assert p.ratio >= 1.42
    assert 0.015 < escape_count(p) / w.numel() < 0.03
    hist = exponent_histogram(w)
    assert int(hist[p.base : p.base + ESCAPE].sum()) == w.numel() - escape_count(p)


def test_k_block_follows_k():
    assert [choose_tk(k) for k in (4096, 14336, 576, 1100, 1)] == [512, 512, 64, 128, 64]
    p = encode(normal(64, 576))  # SmolLM2's hidden size: a 512 block would pad 576 to 1024 (ratio < 1)
    assert p.tk == 64 and p.signman.shape == (64, 576) and p.ratio >= 1.40


def test_encode_rejects_wrong_input():
    with pytest.raises(ValueError, match="bfloat16"):
        encode(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="multiple of 64"):
        encode(torch.zeros(4, 4, dtype=torch.bfloat16), tk=100)


# ---------------------------------------------------------------- the kernel, in Triton's CPU interpreter


# The interpreter must be switched on before triton is first imported (torch imports it), so these tests run in a
# child pytest with TRITON_INTERPRET=1; in this process they skip, and test_kernel_in_interpreter starts the child.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def test_kernel_in_interpreter():
    pytest.importorskip("triton")
    if INTERPRETED:
        pytest.skip("this is the child run")
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: bench/fused_kernel.py checks the compiled kernel")
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
    ("n", "k", "m", "bn", "split", "tk"),
    [
        (32, 512, 1, 16, 1, None),
        (48, 1100, 3, 32, 1, None),
        (40, 1024, 8, 16, 2, None),
        (16, 512, 2, 16, 4, 128),
        (20, 512, 17, 32, 1, None),
    ],
)
def test_interpreted_kernel_equals_reference_variant(kernel, n, k, m, bn, split, tk):
    w = normal(n, k, seed=n + k)
    w[1, :4] = torch.tensor([1e-30, 0.0, -0.0, 2.5e3])  # escapes on both sides of the window
    x = normal(m, k, seed=m, std=1.0)
    p = encode(w, tk=tk)
    cfg = kernel.Config(block_n=bn, num_warps=4, split=split)
    fused = kernel.launch(x, None, p, p.tk, cfg)
    ref = kernel.launch(x, w, None, p.tk, cfg)
    assert torch.equal(fused.view(torch.int16), ref.view(torch.int16))
    exact = x.double() @ w.double().T
    assert float((fused.double() - exact).norm() / exact.norm()) < 1e-2


def test_interpreted_torch_ops_take_leading_dims(kernel):
    w = normal(64, 512, seed=5)
    x = normal(6, 512, seed=6, std=1.0).view(2, 3, 512)
    p = encode(w)
    y = kernel.fused_linear(x, p)
    assert y.shape == (2, 3, 64)
    assert torch.equal(y.view(torch.int16), kernel.reference_linear(x, w).view(torch.int16))
    exact = x.double() @ w.double().T
    assert float((y.double() - exact).norm() / exact.norm()) < 1e-2
