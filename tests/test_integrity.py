"""Integrity of compressed weights in memory: a corrupted byte never becomes a weight.

What the integrity design guarantees (and what these fault-injection tests hold it to):
- In memory, the runtime checks the decompressed weight against the xxh3 of the original (compress.verify):
  a flip that changes the weight raises IntegrityError naming the layer before any weight is returned. A flip
  that zstd ignores (e.g. unused bits of an entropy table) decodes to the bit-identical weight: harmless, and no
  content checksum can see it (~1 in 1500 flips for zstd_grouped).
- verify=first checks only the first decode of each layer. Afterwards the codecs' own checks still catch a flip:
  zstd's frame checksums, and for zstd_grouped's incompressible planes (stored raw) an xxh3 per raw frame.
On disk (the artifact cache) every byte is covered too: tests/test_artifacts.py.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch

from harness.artifacts import artifact_key, compress_cached
from harness.codecs import make_codec
from harness.errors import IntegrityError
from harness.generation import greedy_generate
from harness.runtime import compress_model
from harness.runtime.compress import CompressedRuntime
from harness.selection import select_layers

TRIALS = 150
IDENTITY = {"kind": "tiny", "name": "tiny", "source": "random init (tiny, seed=0)", "dtype": "bfloat16"}
PROMPTS = ["The capital of France is", "Compression, losslessly:"]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny(tiny_dense, tiny_reference):
    """The dense tiny model and its greedy output on PROMPTS: what every compressed copy must reproduce."""
    return tiny_dense, tiny_reference(PROMPTS, 3)


def generate(loaded, model):
    return greedy_generate(model, loaded.tokenizer, PROMPTS, max_new_tokens=3, min_new_tokens=3)


def compressed(loaded, codec="zstd_grouped", cache=None, **kw):
    model = copy.deepcopy(loaded.model)
    runtime = compress_cached(model, make_codec(codec), cache, IDENTITY, layers="all", policy="none", progress=False, **kw)
    return model, runtime


def key_of(loaded, codec="zstd_grouped", layers="all", identity=IDENTITY, **settings):
    return artifact_key(identity, select_layers(loaded.model, layers), make_codec(codec, **settings))


def flip(t: torch.Tensor, rng: random.Random) -> tuple[int, int]:
    pos, bit = rng.randrange(t.numel()), rng.randrange(8)
    t[pos] ^= 1 << bit
    return pos, bit


def decode_flipped(runtime, verify, seed, warm=False):
    """TRIALS random bit flips in random payloads, each decoded once, then undone: (detected, identical, wrong)."""
    rng = random.Random(seed)
    reference = {layer.name: runtime.codec.decode(layer.ct).clone() for layer in runtime.layers}
    checker = CompressedRuntime(runtime.codec, verify=verify)
    if warm:  # every layer already decoded and verified once
        for layer in runtime.layers:
            checker.decompress(layer, CPU)
    detected = identical = wrong = 0
    for _ in range(TRIALS):
        layer = rng.choice(runtime.layers)
        pos, bit = flip(layer.ct.payload, rng)
        try:
            w = checker.decompress(layer, CPU)
        except IntegrityError as e:
            assert layer.name in str(e)
            detected += 1
        else:
            if torch.equal(w.view(torch.uint8), reference[layer.name].view(torch.uint8)):
                identical += 1
            else:
                wrong += 1
        finally:
            layer.ct.payload[pos] ^= 1 << bit
    return detected, identical, wrong


@pytest.mark.parametrize("codec", ["zstd", "zstd_grouped"])
def test_payload_flips_never_become_weights(tiny, codec):
    _, runtime = compressed(tiny[0], codec)
    detected, identical, wrong = decode_flipped(runtime, "first", seed=1)
    assert wrong == 0
    assert detected + identical == TRIALS and detected >= TRIALS - 2, (detected, identical)


@pytest.mark.parametrize(
    "codec,verify", [("zstd", "first"), ("zstd", "always"), ("zstd_grouped", "first"), ("zstd_grouped", "always")]
)
def test_flips_after_the_first_decode(tiny, codec, verify):
    """After the first verified decode, the codecs' own checks (zstd frame checksums, raw-frame xxh3) still
    catch every flip that would change the weight under verify=first."""
    _, runtime = compressed(tiny[0], codec)
    detected, identical, wrong = decode_flipped(runtime, verify, seed=2, warm=True)
    assert wrong == 0 and detected >= TRIALS - 2, (detected, identical)


@pytest.mark.parametrize("policy", ["prefetch", "full"])
def test_a_corrupted_layer_stops_generation(tiny, policy):
    loaded, _ = tiny
    model = copy.deepcopy(loaded.model)
    runtime = compress_model(model, make_codec("zstd_grouped"), layers="all", policy=policy, progress=False)
    victim = runtime.layers[5]
    assert victim.ct.meta["frame_kinds"][-1] == "r"
    victim.ct.payload[-1] ^= 0x10  # the last byte: in the raw sign/mantissa plane, which zstd never checks
    for _ in range(2):  # and again: a weight that failed its check is never cached as verified
        with pytest.raises(IntegrityError, match=victim.name):
            generate(loaded, model)
        runtime.end_generation()


def test_a_policys_own_decode_is_checked_and_counted_like_the_codecs(tiny):
    """cache=fused hands runtime.decompress its prepared decode (`decode=`): that weight is verified against the
    original's checksum and counted exactly as the codec's would be; a wrong one never becomes a weight."""
    loaded, _ = tiny
    _, runtime = compressed(loaded)
    checker = CompressedRuntime(runtime.codec, verify="always")
    layer = runtime.layers[0]
    right = runtime.codec.decode(layer.ct)
    w = checker.decompress(layer, CPU, decode=lambda: right)
    assert w is right and checker.stats.decompressions == 1 and checker.stats.verifications == 1
    checker.drop(layer)
    wrong = right.clone()
    wrong.view(torch.int16).view(-1)[0] ^= 1
    with pytest.raises(IntegrityError, match=layer.name):
        checker.decompress(layer, CPU, decode=lambda: wrong)
