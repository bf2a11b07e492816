"""README's "Extending the harness", done here: a codec and a cache policy added exactly as the section says (one
registered class each, in a file of its own, plus its config entry), then built through the same calls the CLI
makes. If the section's
recipe stops working, these fail. (Adding a results field is tested with the schema.)"""

from __future__ import annotations

import importlib.util
import sys
import textwrap

import pytest
import torch
from conftest import compose_config
from omegaconf import open_dict

from harness.codecs import CODECS, make_codec
from harness.components import build_codec, policy_factory
from harness.errors import HarnessError
from harness.generation import greedy_generate
from harness.models import tiny_llama
from harness.runtime import compress_model
from harness.runtime.policy import POLICIES

CODEC_FILE = '''
"""A codec as README's recipe writes one: raw bytes, no compression (the simplest lossless codec)."""
import torch

from harness.codecs.base import CODECS, Codec, CompressedTensor, checksum, dtype_name, raw_bytes


@CODECS.register("raw_copy")
class RawCopy(Codec):
    name = "raw_copy"

    def encode(self, t):
        return CompressedTensor(codec=self.name, shape=tuple(t.shape), dtype=dtype_name(t.dtype),
                                original_nbytes=t.numel() * t.element_size(), checksum=checksum(t),
                                payload=raw_bytes(t).clone())

    def decode(self, ct, out=None):
        w = ct.payload.view(ct.torch_dtype).view(ct.shape)
        return w.clone() if out is None else out.copy_(w)
'''

POLICY_FILE = '''
"""A cache policy as README's recipe writes one: decode at first use and keep every layer (like `full`)."""
from harness.runtime.policy import POLICIES, CachePolicy


@POLICIES.register("keep_all")
class KeepAll(CachePolicy):
    name = "keep_all"

    def __init__(self, runtime):
        super().__init__(runtime)
        self.kept = {}

    def acquire(self, layer, device):
        if layer.index not in self.kept:
            self.kept[layer.index] = self.runtime.decompress(layer, device)
        return self.kept[layer.index]

    def clear(self):
        for index in list(self.kept):
            del self.kept[index]
            self.runtime.drop(self.runtime.layers[index])
'''


def _import_file(tmp_path, name: str, source: str):
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(source))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # importable by name, as a config's _target_ imports it
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def added(tmp_path):
    """Import the two new files; unregister them afterwards so no other test sees them."""
    _import_file(tmp_path, "raw_copy_codec", CODEC_FILE)
    _import_file(tmp_path, "keep_all_policy", POLICY_FILE)
    yield
    CODECS._entries.pop("raw_copy", None)
    POLICIES._entries.pop("keep_all", None)
    sys.modules.pop("raw_copy_codec", None)
    sys.modules.pop("keep_all_policy", None)


def configured(overrides: list[str]):
    """The composed config with the two new entries, as README says to add them: one in compress.codecs, and a
    conf/cache file's content as the cache group."""
    cfg = compose_config(*overrides)
    with open_dict(cfg):
        cfg.compress.codecs.raw_copy = {"_target_": "raw_copy_codec.RawCopy"}
        cfg.cache = {"_target_": "harness.runtime.policy.make_policy", "_partial_": True, "name": "keep_all"}
    return cfg


def test_a_new_codec_and_policy_run_bit_exact_with_exact_counts(added):
    dense = tiny_llama(seed=3)
    ref = greedy_generate(dense.model, dense.tokenizer, ["hello"], 6, 6)
    model = tiny_llama(seed=3).model
    cfg = configured(["compress.codec=raw_copy"])
    rt = compress_model(model, build_codec(cfg.compress), policy=policy_factory(cfg.cache), layers="all", progress=False)
    rt.reset_stats()
    out = greedy_generate(model, dense.tokenizer, ["hello"], 6, 6)
    rt.end_generation()
    snap = rt.stats.snapshot()
    assert out.new_token_ids == ref.new_token_ids and torch.equal(out.logits, ref.logits)
    assert snap["decompressions"] == len(rt.layers)  # kept after the first use: one decode per layer
    assert rt.report.layers_compressed == len(rt.layers) > 0


def test_a_new_name_is_in_the_did_you_mean_errors(added):
    with pytest.raises(HarnessError, match="Did you mean 'raw_copy'"):
        make_codec("raw_cpy")
    with pytest.raises(HarnessError, match="Did you mean 'raw_copy'"):
        build_codec(configured(["compress.codec=raw_cpy"]).compress)
    with pytest.raises(HarnessError, match="Did you mean 'keep_all'"):
        POLICIES.get("keep_al")
