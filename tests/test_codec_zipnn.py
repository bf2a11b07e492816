"""zipnn (the real ZipNN package) as a harness codec: bitwise round trips, integrity, settings, the runtime."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import RunIf, assert_generation_bit_exact
from test_codecs import DTYPES, bits, weights_with_specials

from harness.codecs import CompressedTensor, checksum, make_codec
from harness.errors import HarnessError, IntegrityError

pytestmark = RunIf(packages=["zipnn"])  # harness imports zipnn only when the codec is made

SMALL_CHUNK = 4096  # several ZipNN chunks even for small tensors


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1,), (15,), (3, 1000), (257, 129)])
def test_zipnn_round_trip_bitwise(dtype, shape):
    t = weights_with_specials(torch.Size(shape).numel(), dtype).reshape(shape)  # NaN payloads, -0.0, subnormals
    codec = make_codec("zipnn", chunk_bytes=SMALL_CHUNK)
    ct = codec.encode(t)
    assert ct.checksum == checksum(t) and ct.payload.dtype == torch.uint8
    json.dumps(ct.header())
    out = codec.decode(ct)
    assert out.shape == t.shape and out.dtype == t.dtype
    assert torch.equal(bits(out), bits(t))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_into_out_threads_and_header(dtype):
    t = weights_with_specials(300_001, dtype, seed=1)
    ct = make_codec("zipnn", threads=2).encode(t)
    assert torch.equal(make_codec("zipnn", threads=1).encode(t).payload, ct.payload)  # threads never change bytes
    again = CompressedTensor.from_header(json.loads(json.dumps(ct.header())), ct.payload.clone())
    out = torch.full_like(t, 3.0)
    assert make_codec("zipnn", threads=2, chunk_bytes=1 << 20).decode(again, out=out) is out  # meta's chunk wins
    assert torch.equal(bits(out), bits(t))


def test_zipnn_ratio_on_random_bf16():
    """normal(0, 0.02) bf16: ZipNN's Huffman on the exponent byte is near the ~1.5x bound."""
    t = (torch.randn(1 << 21, generator=torch.Generator().manual_seed(0)) * 0.02).bfloat16()
    assert 1.45 <= make_codec("zipnn").encode(t).ratio <= 1.55


def test_zipnn_corrupted_payload_raises():
    t = (torch.randn(50_000) * 0.02).bfloat16()
    codec = make_codec("zipnn")
    ct = codec.encode(t)
    ct.payload[ct.payload.numel() // 2] ^= 0x01
    with pytest.raises(IntegrityError, match="zipnn payload is corrupted"):
        codec.decode(ct)


def test_settings_and_bad_input():
    assert make_codec("zipnn", threads=4).settings() == make_codec("zipnn").settings()
    assert make_codec("zipnn", chunk_bytes=1 << 20).settings()["chunk_bytes"] == 1 << 20
    assert make_codec("zipnn").settings()["zipnn"] == "0.5.4"
    for bad in ({"threads": 0}, {"chunk_bytes": 3000}, {"chunk_bytes": 512}):
        with pytest.raises(HarnessError, match="zipnn:"):
            make_codec("zipnn", **bad)
    with pytest.raises(HarnessError, match="unsupported dtype"):
        make_codec("zipnn").encode(torch.ones(4, dtype=torch.float64))
    codec = make_codec("zipnn")
    assert codec.decode(codec.encode(torch.empty(0, 3, dtype=torch.bfloat16))).shape == (0, 3)
    with pytest.raises(ValueError, match="out must be"):
        codec.decode(codec.encode(torch.ones(10, dtype=torch.bfloat16)), out=torch.empty(10, dtype=torch.float16))


def test_zipnn_runtime_generation_is_bit_exact(tiny_dense, tiny_reference):
    assert_generation_bit_exact(tiny_dense, tiny_reference, "zipnn", "per_forward_pass")
