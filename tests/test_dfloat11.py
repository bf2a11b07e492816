"""dfloat11 on the CPU: the vectorised encoder gives DF11's own bytes, and the reference decoder rebuilds the bits.

DF11's `encode` (its per-element Python loop) and its table builders run for real: they are loaded from the
installed package's `dfloat11_utils.py`, which imports neither cupy nor pkg_resources (only the package's
`__init__` does). The CUDA path is in test_gpu.py.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import json

import numpy as np
import pytest
import torch
from conftest import RunIf, assert_generation_bit_exact

from harness.codecs import CompressedTensor, checksum, make_codec
from harness.codecs import dfloat11_format as fmt
from harness.errors import HarnessError, IntegrityError

# The codec loads dahuffman and dfloat11 only when it is made: without them these tests skip, never fail to import.
pytestmark = RunIf(packages=["dahuffman", "dfloat11"])


def bf16_weights(n: int, seed: int = 0, std: float = 0.02) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g) * std).bfloat16()


def df11_reference(t: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray, torch.Tensor]:
    """DF11's own pipeline, as its compress_model runs it: get_codec -> get_32bit_codec -> get_luts -> encode."""
    utils = fmt.df11_utils()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        _, counter = utils.get_codec(t)
        codec, _, table = utils.get_32bit_codec(counter)
        try:
            luts = utils.get_luts(table)
        except UnboundLocalError:  # DF11's get_luts fails when EOF has the all-zero code (see below)
            luts = None
        encoded, gaps, positions = utils.encode(fmt.split_bf16(t)[0].tolist(), codec, 8, 512)
    return encoded, gaps, positions, luts


def special_bf16() -> torch.Tensor:
    """-0.0, +0.0, subnormals, the smallest normals, large finite values DF11 can still code (exponent < 240)."""
    bits = [0x8000, 0x0000, 0x0001, 0x807F, 0x0080, 0x8080, 0x7780, 0xF77F, 0x3F80]
    return torch.tensor(bits, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)


CASES = {
    "normal_70001": lambda: bf16_weights(70_001),  # several kernel blocks, ends mid-byte or not
    "normal_4096": lambda: bf16_weights(4096, seed=1),
    "wide_std": lambda: bf16_weights(50_000, seed=2, std=30.0),  # many exponents: longer codes, chained LUTs
    "two_values": lambda: torch.tensor([0.5, 1.0] * 30_000, dtype=torch.bfloat16),  # 1-2 bit codes: dense blocks
    # 95% one value: ~31k elements per kernel block, 64 KB of shared memory (more than DF11's loader allows)
    "skewed": lambda: torch.where(
        torch.rand(100_000, generator=torch.Generator().manual_seed(4)) < 0.05, 1.0, 0.5
    ).bfloat16(),
    "specials": lambda: torch.cat([bf16_weights(20_000, seed=3), special_bf16()]),
}


@pytest.mark.parametrize("case", CASES)
def test_vectorised_encoder_gives_df11_bytes(case):
    t = CASES[case]()
    ref_encoded, ref_gaps, ref_positions, ref_luts = df11_reference(t)
    exponent, _ = fmt.split_bf16(t)
    table, luts = fmt.build_tables(exponent)
    encoded, gaps, positions = fmt.encode_exponents(exponent, table, chunk=1000)  # several chunks
    assert np.array_equal(encoded.numpy(), ref_encoded)
    assert np.array_equal(gaps.numpy(), ref_gaps)
    assert np.array_equal(positions.numpy().astype(np.uint32), ref_positions)
    if ref_luts is None:  # DF11 cannot build these LUTs; ours decode (test_round_trip_bitwise)
        assert case == "skewed"
    else:
        assert torch.equal(luts, ref_luts)


def test_tables_where_df11_get_luts_fails():
    """One element: EOF gets the all-zero 1-bit code and DF11's get_luts raises; our tables still decode."""
    t = torch.tensor([0.25], dtype=torch.bfloat16)
    utils = fmt.df11_utils()
    with pytest.raises(UnboundLocalError), contextlib.redirect_stdout(io.StringIO()):
        utils.get_luts(utils.get_32bit_codec(utils.get_codec(t)[1])[2])
    codec = make_codec("dfloat11", decoder="cpu")
    assert torch.equal(codec.decode(codec.encode(t)).view(torch.int16), t.view(torch.int16))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("shape", [None, (7, -1)])
def test_df11_round_trip_bitwise(case, shape):
    t = CASES[case]()
    if shape is not None:
        t = t[: t.numel() // 7 * 7].reshape(shape)
    codec = make_codec("dfloat11")
    assert codec.decode_device == ("cuda" if torch.cuda.is_available() else "cpu")  # never a silent CPU fallback
    ct = codec.encode(t)
    assert ct.checksum == checksum(t) and ct.original_nbytes == 2 * t.numel()
    json.dumps(ct.header())
    out = torch.empty_like(t)
    assert make_codec("dfloat11", decoder="cpu").decode_cpu(ct, out=out) is out
    assert torch.equal(out.view(torch.int16), t.view(torch.int16))


def test_payload_holds_df11_buffers_and_launch_geometry():
    t = bf16_weights(100_000)
    ct = make_codec("dfloat11").encode(t)
    ref_encoded, ref_gaps, ref_positions, ref_luts = df11_reference(t)
    buf = {name: make_codec("dfloat11").buffer(ct, ct.payload, name).numpy() for name in ct.meta["offsets"]}
    assert np.array_equal(buf["encoded_exponent"], ref_encoded) and np.array_equal(buf["gaps"], ref_gaps)
    assert np.array_equal(buf["output_positions"].view(np.uint32), ref_positions)
    assert np.array_equal(buf["luts"], ref_luts.numpy().reshape(-1))
    assert np.array_equal(buf["sign_mantissa"], fmt.split_bf16(t)[1].numpy())
    assert all(off % 16 == 0 for off in ct.meta["offsets"].values())
    # DF11's loader: blocks = ceil(n_bytes / (512 * 8)); shared memory = 512*4 + 4 + 2 * max elements per block
    assert ct.meta["blocks"] == -(-ref_encoded.size // 4096)
    assert ct.meta["shared_mem"] == 512 * 4 + 4 + int(np.diff(ref_positions.astype(np.int64)).max()) * 2
    assert ct.meta["n_luts"] == ref_luts.shape[0]
    assert ct.ratio > 1.4  # normal(0, 0.02): ~1.47 including the tables


def test_empty_and_header_round_trip():
    codec = make_codec("dfloat11")
    assert codec.decode(codec.encode(torch.empty(0, 4, dtype=torch.bfloat16))).shape == (0, 4)
    t = bf16_weights(5000).reshape(50, 100)
    ct = codec.encode(t)
    again = CompressedTensor.from_header(json.loads(json.dumps(ct.header())), ct.payload.clone())
    assert torch.equal(make_codec("dfloat11", decoder="cpu").decode(again).view(torch.int16), t.view(torch.int16))


def test_corruption_is_detected():
    t = bf16_weights(30_000)
    ct = make_codec("dfloat11").encode(t)
    bad = copy.copy(ct)
    bad.payload = ct.payload.clone()
    bad.payload[ct.meta["offsets"]["encoded_exponent"] + 100] ^= 0x10
    with pytest.raises(IntegrityError, match="xxh3"):
        make_codec("dfloat11", decoder="cpu").decode(bad)
    # the reference decoder itself notices a stream that disagrees with output_positions
    part = {name: make_codec("dfloat11").buffer(ct, ct.payload, name).numpy().copy() for name in ct.meta["offsets"]}
    positions = part["output_positions"].view(np.uint32)
    positions[1] += 1
    with pytest.raises(IntegrityError, match="output_positions"):
        fmt.decode_exponents(
            part["luts"].reshape(-1, 256), part["encoded_exponent"], positions, part["gaps"], t.numel()
        )


def test_bad_input_is_a_clear_error():
    codec = make_codec("dfloat11")
    with pytest.raises(HarnessError, match="bfloat16 only"):
        codec.encode(torch.ones(8, dtype=torch.float16))
    for value in (float("inf"), float("nan"), 3e38):  # exponent byte 255, 255, 254
        with pytest.raises(HarnessError, match="zstd_grouped"):
            codec.encode(torch.tensor([0.01, value], dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="out must be"):
        codec.decode_cpu(codec.encode(bf16_weights(100)), out=torch.empty(99, dtype=torch.bfloat16))
    with pytest.raises(HarnessError, match="decoder="):
        make_codec("dfloat11", decoder="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(HarnessError, match="cupy"):
            make_codec("dfloat11", decoder="cuda")
    settings = codec.settings()
    assert settings["dfloat11"] == "0.5.0" and settings["threads_per_block"] == 512
    assert codec.format_modules == ("harness.codecs.dfloat11_format",)  # the encoder: hashed by the artifact cache


def test_missing_package_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "dfloat11" else real(name, *a))
    fmt.df11_utils.cache_clear()
    try:
        with pytest.raises(HarnessError, match=r"pip install 'codecllm-harness\[dfloat11\]'"):
            make_codec("dfloat11")
    finally:
        fmt.df11_utils.cache_clear()


def test_df11_runtime_generation_is_bit_exact(tiny_dense, tiny_reference):
    assert_generation_bit_exact(tiny_dense, tiny_reference, "dfloat11", "none")
