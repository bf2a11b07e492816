"""The fused_lut3 codec on the CPU: lossless round trips, the Lut3 views the kernel is handed, the artifact cache,
and weights it cannot store (skipped with lut3's reason, or refused in one line)."""

from __future__ import annotations

import copy

import pytest
import torch

from harness.artifacts import ArtifactCache, compress_cached
from harness.codecs import make_codec
from harness.codecs.fused_lut3 import FusedLut3Codec
from harness.errors import HarnessError
from harness.fused import lut3
from harness.models import tiny_llama
from harness.selection import select_layers


def _normal(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, generator=g) * 0.02).to(torch.bfloat16)


@pytest.mark.parametrize("shape", [(16, 64), (259, 64), (33, 192), (128, 128)])  # 259, 33: padding rows
def test_round_trip_is_bit_exact_and_views_are_the_format(shape):
    w = _normal(*shape, seed=shape[0])
    codec = make_codec("fused_lut3")
    ct = codec.encode(w)
    assert torch.equal(codec.decode(ct).view(torch.int16), w.view(torch.int16))
    p, direct = FusedLut3Codec.packed(ct), lut3.encode(w)
    for name in ("signman", "codes", "esc_exp", "esc_off"):
        view = getattr(p, name)
        assert torch.equal(view, getattr(direct, name)), name
        assert view.untyped_storage().data_ptr() == ct.payload.untyped_storage().data_ptr(), name  # a view, no copy
    assert p.exponents == direct.exponents and p.shape == shape
    # the payload is the format's bytes plus alignment only
    assert direct.nbytes() - len(direct.exponents) <= ct.compressed_nbytes < direct.nbytes() + 4 * 16


def test_every_bf16_bit_pattern_round_trips():
    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).reshape(512, 128)
    codec = make_codec("fused_lut3")
    ct = codec.encode(every)
    out = torch.empty_like(every)
    assert codec.decode(ct, out=out) is out and torch.equal(out.view(torch.int16), every.view(torch.int16))


def test_artifact_cache_stores_and_reloads_it(tmp_path):
    loaded = tiny_llama(seed=0)
    cache = ArtifactCache(tmp_path)
    identity = {"kind": "tiny", "name": "tiny", "source": "test", "dtype": "bfloat16"}
    runtimes = []
    for _ in range(2):
        model = copy.deepcopy(loaded.model)
        runtimes.append(compress_cached(model, make_codec("fused_lut3"), cache, identity, layers="all",
                                        policy="fused", progress=False))  # fmt: skip
    miss, hit = runtimes
    assert miss.report.artifact_cache_hit is False and hit.report.artifact_cache_hit is True
    assert len(hit.layers) == 15 and hit.report.compressed_bytes == miss.report.compressed_bytes
    for a, b in zip(miss.layers, hit.layers, strict=True):
        assert a.ct.header() == b.ct.header() and torch.equal(a.ct.payload, b.ct.payload)
        assert torch.equal(hit.codec.decode(b.ct), miss.codec.decode(a.ct))
    assert hit.lossless() == {"weights_lossless": True, "weights_checked_layers": 15}  # checked after the load
    for runtime in runtimes:
        runtime.close()


def test_layers_it_cannot_store_are_skipped_with_the_reason():
    """hidden 96: every layer reading the hidden state (in_features 96, lm_head too) cannot be lut3; down_proj
    (in_features 128) can."""
    model = tiny_llama(seed=0, hidden_size=96, intermediate_size=128).model
    sel = select_layers(model, "all", refuse=FusedLut3Codec.refuse)
    assert sel.names == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert len(sel.skipped) == 13 and all("divisible by 64 (got 96)" in why for why in sel.skipped.values())
    with pytest.raises(HarnessError, match=r"only 2 of 15 .*\(13 skipped, e.g. model.layers.0.self_attn.q_proj: lut3"):
        select_layers(model, 3, refuse=FusedLut3Codec.refuse)


def test_non_bf16_weights_are_refused():
    with pytest.raises(HarnessError, match="codec fused_lut3: lut3 stores bfloat16 weights only"):
        make_codec("fused_lut3").encode(torch.zeros(16, 64, dtype=torch.float32))
    assert "bfloat16" in FusedLut3Codec.refuse((16, 64), torch.float16)
    assert FusedLut3Codec.refuse((16, 64), torch.bfloat16) is None
