"""generate.compile=true on the CPU: static cache + torch.compile (Inductor, no CUDA graphs) for both phases, the
compressed weights served through the capturable policies. Bit-exact with the compiled dense model, and the
device-side counters equal the eager policy's exact counts."""

import copy

import pytest
import torch

from harness.codecs import make_codec
from harness.errors import HarnessError
from harness.generation import greedy_generate
from harness.models import tiny_llama
from harness.phases.compiled import compile_mode, release_compiled, reset_compile_counters
from harness.runtime import CAPTURED_POLICIES, compress_model
from harness.runtime.captured import OpaqueEmbedding

PROMPTS = ["The capital of France is"]
# The policies that decode weights with the codec (cache=fused computes with its own codec: test_fused_policy.py)
DECODING = sorted(n for n in CAPTURED_POLICIES.names() if not CAPTURED_POLICIES.get(n).computes_linear)
NEW = 5
LAYERS = 2 * 7 + 1  # tiny Llama: 2 blocks x 7 linear layers + the untied lm_head


def generate(model, tokenizer, compile):
    return greedy_generate(model, tokenizer, PROMPTS, max_new_tokens=NEW, min_new_tokens=NEW, compile=compile)


@pytest.fixture(scope="module")
def dense():
    """The tiny model's compiled dense generation (twice: the second must equal the first)."""
    loaded = tiny_llama(seed=0)
    reset_compile_counters()
    first = generate(loaded.model, loaded.tokenizer, True)
    mode = compile_mode(torch.device("cpu"))
    second = generate(loaded.model, loaded.tokenizer, True)
    release_compiled(loaded.model)
    return loaded, first, second, mode


def run_compressed(loaded, policy, compile, generations=2, **kw):
    model = copy.deepcopy(loaded.model)
    runtime = compress_model(model, make_codec("zstd_grouped"), policy=policy, layers="all", progress=False,
                             captured=compile, attach=False, **kw)
    runtime.attach(model)
    outs, counts = [], []
    reset_compile_counters()
    try:
        for _ in range(generations):
            runtime.reset_stats()
            outs.append(generate(model, loaded.tokenizer, compile))
            runtime.end_generation()
            counts.append(runtime.stats.snapshot())
        mode = compile_mode(torch.device("cpu"))
    finally:
        runtime.close()
        release_compiled(model)
    return outs, counts, mode


def test_deterministic_compile_holds_inductor_still_only_inside():
    import torch._inductor.config as inductor_config

    from harness.generation import deterministic_compile

    before = inductor_config.deterministic
    with deterministic_compile():
        assert inductor_config.deterministic is True
    assert inductor_config.deterministic == before


def test_a_decoding_policy_compiles_in_the_default_mode(dense):
    """Only a policy with an exactness reference (cache=fused) compiles in Inductor's deterministic mode."""
    from harness.phases.module import GenerationModule

    loaded = dense[0]
    model = copy.deepcopy(loaded.model)
    runtime = compress_model(model, make_codec("zstd_grouped"), policy="block", layers="all", progress=False,
                             captured=True, attach=False)  # fmt: skip
    module = GenerationModule(model, loaded.tokenizer, NEW, NEW, compile=True)
    module.runtime = runtime
    assert not module.deterministic_compile
    module.close()
    runtime.close()


def test_dense_compiles_and_repeats_itself(dense):
    _, first, second, mode = dense
    assert mode == "inductor"  # really compiled (dynamo built graphs), no CUDA graphs on the CPU
    assert torch.equal(first.logits, second.logits)


@pytest.mark.parametrize("policy", DECODING)
def test_compiled_compressed_is_bit_exact_with_compiled_dense(dense, policy):
    loaded, ref, _, _ = dense
    outs, counts, mode = run_compressed(loaded, policy, compile=True)
    assert mode == "inductor"
    for out in outs:
        assert out.new_token_ids == ref.new_token_ids
        assert torch.equal(out.logits, ref.logits)  # every logit of every step, bit for bit


@pytest.mark.parametrize("policy,embeddings", [(p, False) for p in DECODING] + [("block", True)])
def test_compiled_counts_equal_the_eager_policy(dense, policy, embeddings):
    loaded, ref, _, _ = dense
    outs, compiled, _ = run_compressed(loaded, policy, compile=True, embeddings=embeddings)
    _, eager, _ = run_compressed(loaded, policy, compile=False, embeddings=embeddings)
    if embeddings:  # bit-exact with the dense model whose lookup sits behind the same kind of op boundary
        reference = copy.deepcopy(loaded.model)
        reference.model.embed_tokens = OpaqueEmbedding(reference.model.embed_tokens)
        opaque = generate(reference, loaded.tokenizer, True)
        release_compiled(reference)
        assert not torch.equal(opaque.logits, ref.logits)  # the boundary alone changes Inductor's arithmetic...
        assert torch.equal(outs[-1].logits, opaque.logits)  # ...and the compressed lookup changes nothing more
    for c, e in zip(compiled, eager, strict=True):
        # analytic: every layer once per pass (L x P, + one table lookup), counted per pass and per layer
        assert c["forward_passes"] == e["forward_passes"] == NEW
        assert c["decompressions_per_pass"] == e["decompressions_per_pass"] == [LAYERS + embeddings] * NEW
        assert c["decompressions_per_layer"] == e["decompressions_per_layer"]
        assert c["bytes_decompressed"] == e["bytes_decompressed"]
    assert compiled[0]["decompress_time_s"] is None  # decodes inside compiled steps are not host-timed


def test_block_holds_one_block_compiled(dense):
    loaded, _, _, _ = dense
    _, counts, _ = run_compressed(loaded, "block", compile=True, generations=1)
    largest_block = max(
        sum(m.weight.numel() * m.weight.element_size() for m in block.modules() if isinstance(m, torch.nn.Linear))
        for block in loaded.model.model.layers
    )
    assert 0 < counts[0]["peak_resident_decompressed_bytes"] <= largest_block + 7 * 256  # alignment padding


def test_policies_without_a_compiled_form_are_refused():
    loaded = tiny_llama(seed=0)
    with pytest.raises(HarnessError, match="cache policy under generate.compile=true"):
        compress_model(loaded.model, make_codec("zstd_grouped"), policy="lru", policy_options={"budget_mb": 10},
                       layers="all", progress=False, captured=True)


def test_block_ahead_and_verify_always_are_refused():
    loaded = tiny_llama(seed=0)
    with pytest.raises(HarnessError, match="cache.ahead=1 has no compiled form"):
        compress_model(copy.deepcopy(loaded.model), make_codec("zstd_grouped"), policy="block",
                       policy_options={"ahead": 1}, layers="all", progress=False, captured=True)
    with pytest.raises(HarnessError, match="verify=always"):
        compress_model(copy.deepcopy(loaded.model), make_codec("zstd_grouped"), policy="block", verify="always",
                       layers="all", progress=False, captured=True)


def test_cli_runs_compiled_on_the_cpu(tmp_path, harness_cli):
    """`python -m harness model=tiny compress.layers=all cache=block generate.compile=true`, as a user types it."""
    import json

    proc = harness_cli(["model=tiny", "compress.layers=all", "cache=block", "generate.compile=true", "logger=none",
                        "generate.max_new_tokens=4", "generate.repeats=2", f"hydra.run.dir={tmp_path}",
                        f"compress.artifact_dir={tmp_path / 'art'}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["baseline"]["compile"] == res["compressed"]["compile"] == "inductor"
    assert res["compressed"]["warmup"] == 2 and res["compressed"]["warmup_time_s"] > 0
    assert res["comparison"]["outputs_match"]
    passes = res["compressed"]["forward_passes"]
    assert res["compressed"]["decompressions"] == 15 * passes  # 15 linear layers once per pass
    assert "compiled" in proc.stdout and "warm-up (compile + capture)" in proc.stdout
