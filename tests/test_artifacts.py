"""The artifact cache: a hit is bit-exact, the key covers everything that changes the bytes, and the cache
survives damage and races.

On disk, every byte of an artifact is covered: the metadata by its xxh3, each payload by its xxh3. Any flip is
detected at load, the artifact is not used, and it is rebuilt with a warning.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import json
import logging
import os
import random
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import pythonpath
from safetensors import safe_open
from test_integrity import IDENTITY, PROMPTS, TRIALS, compressed, generate, key_of

from harness import artifacts
from harness.artifacts import ArtifactCache, artifact_key, cache_root
from harness.codecs import make_codec
from harness.codecs.base import CODECS
from harness.models import tiny_llama
from harness.selection import select_layers


@pytest.fixture(scope="module")
def tiny(tiny_dense, tiny_reference):
    """The dense tiny model and its greedy output on PROMPTS: what every compressed copy must reproduce."""
    return tiny_dense, tiny_reference(PROMPTS, 3)


def test_cache_hit_is_bit_exact_and_reported(tiny, tmp_path):
    loaded, ref = tiny
    cache = ArtifactCache(tmp_path)
    model, first = compressed(loaded, cache=cache)
    assert first.report.artifact_cache_hit is False and Path(first.report.artifact_path).is_file()
    model2, second = compressed(loaded, cache=cache)
    r = second.report.as_dict()
    assert r["artifact_cache_hit"] is True and r["artifact_path"] == first.report.artifact_path
    assert r["compress_time_s"] >= r["artifact_time_s"] > 0
    assert r["compressed_bytes"] == first.report.compressed_bytes and r["layers_compressed"] == 15
    for a, b in zip(first.layers, second.layers, strict=True):
        assert a.name == b.name and a.ct.header() == b.ct.header() and torch.equal(a.ct.payload, b.ct.payload)
        assert b.ct.payload.is_pinned() == torch.cuda.is_available()
    out = generate(loaded, model2)
    assert out.new_token_ids == ref.new_token_ids and torch.equal(out.logits, ref.logits)
    assert [p.name for p in tmp_path.iterdir()] == [Path(first.report.artifact_path).name]  # no temp files left
    with safe_open(first.report.artifact_path, framework="pt") as f:  # plain safetensors: no pickle anywhere
        assert len(f.keys()) == 15 and json.loads(f.metadata()["codecllm"].split(" ", 1)[1])["key"]["model"] == IDENTITY


def test_key_covers_weights_codec_settings_and_selection(tiny):
    loaded, _ = tiny
    base = key_of(loaded)
    assert key_of(loaded, threads=4).digest == base.digest  # decode threads do not change the bytes
    different = [
        key_of(loaded, level=5),
        key_of(loaded, codec="zstd"),
        key_of(loaded, layers=14),
        key_of(loaded, identity={**IDENTITY, "source": "elsewhere"}),
    ]
    other = copy.deepcopy(loaded)
    with torch.no_grad():
        other.model.model.layers[1].mlp.up_proj.weight[3, 7] += 1  # one weight of one layer
    different.append(key_of(other))
    assert len({k.digest for k in [base, *different]}) == len(different) + 1
    assert set(base.fields) >= {"model", "codec", "codec_settings", "codec_code_xxh3", "layers", "weights_xxh3_128"}


def _codec_modules_used(cls) -> set[str]:
    """The harness codec/format modules a codec's module takes names from (besides itself and base.py)."""
    mod = sys.modules[cls.__module__]
    used = set()
    for v in vars(mod).values():
        m = v.__name__ if inspect.ismodule(v) else getattr(v, "__module__", None)
        if isinstance(m, str) and m.startswith(("harness.codecs", "harness.fused")):
            used.add(m)
    return used - {cls.__module__, "harness.codecs.base"}


@pytest.mark.parametrize("name", CODECS.names())
def test_code_hash_covers_every_module_a_codec_takes_its_format_from(name, monkeypatch):
    cls = CODECS.get(name)
    assert _codec_modules_used(cls) <= set(cls.format_modules), "add the module to the codec's format_modules"
    for module in cls.format_modules:  # an edit to the format module changes the key: a cached artifact misses
        path = Path(importlib.import_module(module).__file__)
        before = artifacts._code_hash(object.__new__(cls))
        real = Path.read_bytes
        edited = lambda self, real=real, path=path: real(self) + (b"#" if self == path else b"")  # noqa: E731
        monkeypatch.setattr(Path, "read_bytes", edited)
        assert artifacts._code_hash(object.__new__(cls)) != before
        monkeypatch.undo()


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("CODECLLM_CACHE_DIR", raising=False)
    assert cache_root() == Path.home() / ".cache" / "codecllm" / "artifacts"
    monkeypatch.setenv("CODECLLM_CACHE_DIR", str(tmp_path))
    assert cache_root() == tmp_path / "artifacts"
    assert cache_root(tmp_path / "mine") == tmp_path / "mine"


@pytest.fixture
def stored(tiny, tmp_path):
    """An artifact of the tiny model's 15 layers (zstd_grouped): its cache, key and good bytes."""
    loaded, _ = tiny
    cache = ArtifactCache(tmp_path / "artifacts")
    _, runtime = compressed(loaded, cache=cache)
    key = key_of(loaded)
    path = cache.path(key)
    assert str(path) == runtime.report.artifact_path
    return cache, key, path.read_bytes()


def test_every_byte_flip_in_a_stored_artifact_is_detected(stored, caplog):
    cache, key, good = stored
    path = cache.path(key)
    header_end = 8 + struct.unpack("<Q", good[:8])[0]  # safetensors: u64 header length, JSON header, data
    rng = random.Random(3)
    for trial in range(2 * TRIALS):
        data = bytearray(good)
        # Half the flips in the header (offsets, metadata), half in the payloads (most of the file).
        pos = rng.randrange(header_end) if trial % 2 else rng.randrange(header_end, len(good))
        data[pos] ^= 1 << rng.randrange(8)
        path.write_bytes(data)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="harness.artifacts"):
            assert cache.load(key) is None, f"flip at byte {pos} not detected"
        assert str(path) in caplog.text and "compressing again" in caplog.text
    path.write_bytes(good)
    assert cache.load(key) is not None


def _truncate(n):
    return lambda good: good[:n]


DAMAGE = {
    "empty": _truncate(0),
    "half_length_field": _truncate(4),
    "mid_header": lambda good: good[: len(good) // 40],
    "mid_payloads": lambda good: good[: len(good) // 2],
    "last_byte_missing": lambda good: good[:-1],
    "garbage": lambda good: os.urandom(len(good)),
    "zeroed_payload_block": lambda good: good[:-4096] + bytes(2048) + good[-2048:],
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_artifact_is_rebuilt(tiny, stored, damage, caplog):
    loaded, ref = tiny
    cache, key, good = stored
    cache.path(key).write_bytes(DAMAGE[damage](good))
    with caplog.at_level(logging.WARNING, logger="harness.artifacts"):
        model, runtime = compressed(loaded, cache=cache)
    assert "compressing again" in caplog.text
    assert runtime.report.artifact_cache_hit is False
    out = generate(loaded, model)
    assert out.new_token_ids == ref.new_token_ids and torch.equal(out.logits, ref.logits)
    assert cache.path(key).read_bytes() == good  # rebuilt: compression is deterministic
    assert compressed(loaded, cache=cache)[1].report.artifact_cache_hit is True


def test_stale_artifact_is_rebuilt(tiny, stored, caplog):
    """A file at this key's path written for another key (a digest collision, a hand-copied file)."""
    loaded, _ = tiny
    cache, key, good = stored
    other = ArtifactCache(cache.root / "other")
    _, runtime = compressed(loaded, "zstd", cache=other)
    Path(runtime.report.artifact_path).replace(cache.path(key))
    with caplog.at_level(logging.WARNING, logger="harness.artifacts"):
        assert compressed(loaded, cache=cache)[1].report.artifact_cache_hit is False
    assert "stale" in caplog.text and cache.path(key).read_bytes() == good


def test_unwritable_cache_warns_and_the_run_goes_on(tiny, tmp_path, caplog):
    loaded, ref = tiny
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with caplog.at_level(logging.WARNING, logger="harness.artifacts"):
        model, runtime = compressed(loaded, cache=ArtifactCache(blocker / "artifacts"))
    assert "could not write" in caplog.text
    assert runtime.report.artifact_cache_hit is False and runtime.report.artifact_path is None
    assert torch.equal(generate(loaded, model).logits, ref.logits)


WRITER = """
import pathlib, sys, time
from harness.artifacts import ArtifactCache, artifact_key
from harness.codecs import make_codec
from harness.models import tiny_llama
from harness.selection import select_layers

root, ready, go = sys.argv[1:]
model = tiny_llama(seed=0, hidden_size=256, intermediate_size=1024).model  # ~4 MB of weights: writes take a while
codec = make_codec("zstd_grouped")
selection = select_layers(model, "all")
key = artifact_key({"kind": "tiny"}, selection, codec)
layers = {c.name: codec.encode(c.module.weight) for c in selection.chosen}
cache = ArtifactCache(root)
pathlib.Path(ready).touch()
while not pathlib.Path(go).exists():
    time.sleep(0.002)
for _ in range(25):
    assert cache.store(key, layers) is not None, "store failed"
    assert cache.load(key) is not None, "a reader saw a broken artifact"
print(cache.path(key))
"""


def test_two_processes_writing_one_key_both_succeed(tmp_path):
    env = {**os.environ, "PYTHONPATH": pythonpath()}
    root, go = tmp_path / "artifacts", tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(root), str(tmp_path / f"ready{i}"), str(go)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]
    deadline = time.time() + 120
    while not all((tmp_path / f"ready{i}").exists() for i in range(2)) and time.time() < deadline:
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.01)
    go.touch()  # both start writing the same key at the same moment
    results = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err[-3000:]
        assert "artifact cache" not in err, err[-3000:]  # no warning: never a broken file
    paths = {out.strip() for out, _ in results}
    assert len(paths) == 1
    assert [p.name for p in root.iterdir()] == [Path(paths.pop()).name]  # one artifact, no temp files
    model = tiny_llama(seed=0, hidden_size=256, intermediate_size=1024).model
    codec = make_codec("zstd_grouped")
    selection = select_layers(model, "all")
    layers = ArtifactCache(root).load(artifact_key({"kind": "tiny"}, selection, codec))
    assert layers is not None
    for cand in selection.chosen:
        assert torch.equal(codec.decode(layers[cand.name]), cand.module.weight)
