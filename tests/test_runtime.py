"""The compressed-weight runtime on tiny random models: bit-exact outputs and exact counters per policy."""

import copy
from collections import Counter

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from harness.codecs import make_codec
from harness.errors import HarnessError, IntegrityError
from harness.generation import greedy_generate
from harness.models import tiny_llama
from harness.runtime import POLICIES, compress_model
from harness.runtime.block import block_of
from harness.selection import select_layers
from harness.tokenizer import byte_tokenizer

PROMPTS = ["The capital of France is", "Compression, losslessly:"]
NEW = 6
LAYERS = 2 * 7  # tiny Llama: 2 blocks x (q, k, v, o, gate, up, down); lm_head is untied and compressed too


def generate(loaded, n=NEW):
    return greedy_generate(loaded.model, loaded.tokenizer, PROMPTS, max_new_tokens=n, min_new_tokens=n)


@pytest.fixture(scope="module")
def baseline(tiny_dense, tiny_reference):
    return tiny_dense, tiny_reference(PROMPTS, NEW)


def compressed_copy(loaded, policy="per_forward_pass", codec="zstd_grouped", **kw):
    model = copy.deepcopy(loaded.model)
    options = kw.pop("policy_options", {})
    runtime = compress_model(model, make_codec(codec), policy=policy, policy_options=options, progress=False, **kw)
    return type(loaded)(**{**loaded.__dict__, "model": model}), runtime


# L = compressed layers (lm_head included), P = forward passes = NEW (prefill + NEW-1 decode steps)
EXPECTED = {
    "none": lambda L, P: L * P,
    "per_forward_pass": lambda L, P: L * P,
    "full": lambda L, P: L,
    "lru": lambda L, P: L,  # budget fits everything
    "prefetch": lambda L, P: L * P + 2,  # depth 2: the last step prefetches 2 layers of a step that never comes
    "block": lambda L, P: L * P,  # each block once per pass, all its layers together
}


@pytest.mark.parametrize("policy", sorted(EXPECTED))
def test_every_policy_is_bit_exact_with_exact_counts(baseline, policy):
    loaded, ref = baseline
    options = {"lru": {"budget_mb": 1000}, "prefetch": {"depth": 2}}.get(policy, {})
    model, runtime = compressed_copy(loaded, policy, layers="all", policy_options=options)
    out = generate(model)
    runtime.end_generation()
    assert out.new_token_ids == ref.new_token_ids
    assert torch.equal(out.logits, ref.logits)
    stats = runtime.stats.snapshot()
    L = runtime.report.layers_compressed
    assert L == LAYERS + 1
    assert stats["forward_passes"] == NEW
    assert stats["decompressions"] == EXPECTED[policy](L, NEW)
    if policy in ("none", "per_forward_pass", "block"):
        assert stats["decompressions_per_pass"] == [L] * NEW
        assert set(stats["decompressions_per_layer"].values()) == {NEW}
    if policy == "prefetch":
        assert all(n >= NEW for n in stats["decompressions_per_layer"].values())
    assert runtime.stats.resident_bytes == 0  # end_generation dropped everything
    runtime.close()


def test_repeated_generations_count_the_same(baseline):
    loaded, _ = baseline
    model, runtime = compressed_copy(loaded, "prefetch", layers="all", policy_options={"depth": 3})
    counts = []
    for _ in range(3):
        runtime.reset_stats()
        generate(model)
        runtime.end_generation()
        counts.append(runtime.stats.snapshot()["decompressions"])
    L = runtime.report.layers_compressed
    assert counts == [L * NEW + 3] * 3
    runtime.close()


def test_block_policy_holds_one_block_in_one_reused_buffer(baseline):
    loaded, ref = baseline
    model, runtime = compressed_copy(loaded, "block", layers="all")
    out = generate(model)
    assert torch.equal(out.logits, ref.logits)
    blocks = Counter()
    for layer in runtime.layers:
        blocks[block_of(layer.name)] += layer.weight_nbytes
    assert len(blocks) == 3  # 2 transformer blocks + lm_head
    assert runtime.stats.peak_resident_bytes == max(blocks.values())
    assert runtime.policy.scratch_bytes >= max(blocks.values())
    runtime.close()


def test_block_ahead_double_buffers_with_exact_counts(baseline):
    loaded, ref = baseline
    model, runtime = compressed_copy(loaded, "block", layers="all", policy_options={"ahead": 1})
    for _ in range(2):  # a second generation counts the same: each starts cold
        runtime.reset_stats()
        out = generate(model)
        runtime.end_generation()
        assert out.new_token_ids == ref.new_token_ids and torch.equal(out.logits, ref.logits)
        first_block = sum(1 for layer in runtime.layers if block_of(layer.name) == "model.layers.0")
        # pass 1 has no order to predict from; the last pass decodes the next pass's first block for nothing
        assert runtime.stats.decompressions == runtime.report.layers_compressed * NEW + first_block
        assert runtime.stats.resident_bytes == 0
    sizes = Counter()
    for layer in runtime.layers:
        sizes[block_of(layer.name)] += layer.weight_nbytes
    assert runtime.stats.peak_resident_bytes <= 2 * max(sizes.values())
    runtime.close()


def test_lru_budget_bounds_resident_bytes(baseline):
    loaded, ref = baseline
    sizes = sorted(c.nbytes for c in select_layers(loaded.model, "all").chosen)
    budget_bytes = sizes[-1] + sizes[-2]  # room for the two largest, so the cache must evict
    model, runtime = compressed_copy(loaded, "lru", layers="all", policy_options={"budget_mb": budget_bytes / 1e6})
    out = generate(model)
    stats = runtime.stats.snapshot()
    assert out.new_token_ids == ref.new_token_ids and torch.equal(out.logits, ref.logits)
    assert stats["peak_resident_decompressed_bytes"] <= budget_bytes
    assert stats["decompressions"] > runtime.report.layers_compressed  # evictions forced re-decompression
    runtime.close()


def test_per_forward_pass_holds_at_most_one_pass_of_weights(baseline):
    loaded, _ = baseline
    model, runtime = compressed_copy(loaded, "per_forward_pass", layers="all")
    generate(model)
    assert runtime.stats.peak_resident_bytes == runtime.report.original_bytes
    runtime.close()


@pytest.mark.parametrize("bad", [{"budget_mb": 0}, {"budget_mb": -5}, {"budget_mb": 1e-6}])
def test_lru_rejects_budgets_that_cannot_work(baseline, bad):
    with pytest.raises(HarnessError, match="cache.budget_mb"):
        compressed_copy(baseline[0], "lru", layers="all", policy_options=bad)


@pytest.mark.parametrize("policy,bad,key", [("prefetch", {"depth": 0}, "cache.depth"), ("prefetch", {"workers": 0}, "cache.workers"),
                                            ("block", {"ahead": 2}, "cache.ahead")])
def test_policy_options_are_checked(baseline, policy, bad, key):
    with pytest.raises(HarnessError, match=key):
        compressed_copy(baseline[0], policy, layers="all", policy_options=bad)


def test_unknown_policy_suggests_the_right_name(baseline):
    with pytest.raises(HarnessError, match=r"unknown cache policy 'per_forward_pas'.*Did you mean 'per_forward_pass'"):
        compressed_copy(baseline[0], "per_forward_pas", layers=3)
    assert set(POLICIES.names()) == set(EXPECTED) | {"fused"}  # fused needs its own codec: test_fused_policy.py


def test_partial_selection_and_counts(baseline):
    loaded, ref = baseline
    model, runtime = compressed_copy(loaded, "none", layers=5, order="last")
    out = generate(model)
    assert out.new_token_ids == ref.new_token_ids and torch.equal(out.logits, ref.logits)
    assert [layer.name for layer in runtime.layers][-1] == "lm_head"
    assert runtime.stats.decompressions == 5 * NEW
    assert runtime.report.layers_total == LAYERS + 1
    runtime.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_other_dtypes_are_bit_exact(dtype):
    loaded = tiny_llama(seed=1, dtype=dtype)
    ref = generate(loaded, n=3)
    model, runtime = compressed_copy(loaded, "per_forward_pass", layers="all")
    out = generate(model, n=3)
    assert out.new_token_ids == ref.new_token_ids and torch.equal(out.logits, ref.logits)
    runtime.close()


def test_selection_orders_filters_and_limits():
    model = tiny_llama(seed=0).model
    sel = select_layers(model, layers=3, order="first")
    assert sel.names == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"]
    largest = select_layers(model, layers=1, order="largest").names
    assert largest == ["lm_head"]  # vocab 259 x hidden 64 is the largest matrix of the tiny model
    mlp = select_layers(model, layers="all", include=r"mlp\.")
    assert len(mlp.chosen) == 6 and all(".mlp." in n for n in mlp.names)
    no_down = select_layers(model, layers="all", exclude=["down_proj", "lm_head"])
    assert len(no_down.chosen) == LAYERS - 2
    assert select_layers(model, layers=0).chosen == []
    with pytest.raises(HarnessError, match=r"compress.layers=99 but only 15 of 15 .*use at most 15"):
        select_layers(model, layers=99)
    with pytest.raises(HarnessError, match="compress.layers"):
        select_layers(model, layers=-1)
    with pytest.raises(HarnessError, match="compress.order"):
        select_layers(model, layers=1, order="biggest")


def test_tied_lm_head_is_skipped_with_a_reason():
    loaded = tiny_llama(seed=0, tie_word_embeddings=True)
    sel = select_layers(loaded.model, layers="all")
    assert sel.total == LAYERS + 1 and len(sel.chosen) == LAYERS
    assert "lm_head" in sel.skipped and "model.embed_tokens.weight" in sel.skipped["lm_head"]
    ref = generate(loaded, n=3)
    model, runtime = compressed_copy(loaded, "full", layers="all")
    assert torch.equal(generate(model, n=3).logits, ref.logits)
    runtime.close()


def tiny_gpt2():
    """A 2-block GPT-2 (Conv1D layers, tied wte/lm_head, learned position embeddings) and its 4-token reference."""
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=259, bos_token_id=1, eos_token_id=2)
    model = GPT2LMHeadModel(cfg).eval()
    tok = byte_tokenizer()
    return model, tok, greedy_generate(model, tok, PROMPTS, max_new_tokens=4, min_new_tokens=4)


def test_gpt2_conv1d_layers_are_bit_exact():
    model, tok, ref = tiny_gpt2()
    runtime = compress_model(model, make_codec("zstd"), layers="all", policy="none", progress=False)
    assert runtime.report.layers_compressed == 8  # 2 blocks x (c_attn, c_proj, c_fc, mlp c_proj); lm_head tied
    out = greedy_generate(model, tok, PROMPTS, max_new_tokens=4, min_new_tokens=4)
    assert torch.equal(out.logits, ref.logits)
    assert runtime.stats.decompressions == 8 * 4


def test_dense_weights_are_released(baseline):
    loaded, _ = baseline
    model, runtime = compressed_copy(loaded, "none", layers="all")
    dense = sum(p.numel() for n, p in model.model.named_parameters())
    assert dense == loaded.model.model.embed_tokens.weight.numel() + 5 * 64  # embeddings + 5 RMSNorm weights
    runtime.close()


def test_corrupted_bytes_raise_naming_the_layer(baseline):
    loaded, _ = baseline
    model, runtime = compressed_copy(loaded, "none", layers="all", codec="zstd")
    victim = runtime.layers[3]
    victim.ct.payload[victim.ct.payload.numel() // 2] ^= 0xFF
    with pytest.raises(IntegrityError, match=victim.name):
        generate(model, n=1)


@pytest.mark.parametrize("policy", ["none", "per_forward_pass", "block"])
def test_embeddings_compressed_bit_exact_one_lookup_per_pass(baseline, policy):
    """compress.embeddings: the untied input table is compressed too; each pass looks it up once (a counted
    decompression outside the cache policy), outputs stay bit-identical."""
    loaded, ref = baseline
    model, runtime = compressed_copy(loaded, policy, layers="all", embeddings=True)
    assert type(model.model.model.embed_tokens).__name__ == "CompressedEmbedding"
    assert not list(model.model.model.embed_tokens.parameters())  # the dense table is gone
    out = generate(model)
    runtime.end_generation()
    assert torch.equal(out.logits, ref.logits) and out.new_token_ids == ref.new_token_ids
    L = runtime.report.layers_compressed
    assert L == LAYERS + 2 and runtime.report.layers_total == LAYERS + 2  # + lm_head + embed_tokens
    stats = runtime.stats.snapshot()
    assert stats["decompressions"] == L * NEW
    assert stats["decompressions_per_layer"]["model.embed_tokens"] == NEW
    assert runtime.stats.resident_bytes == 0
    runtime.close()


def test_tied_embeddings_are_skipped_with_a_reason():
    loaded = tiny_llama(seed=0, tie_word_embeddings=True)
    sel = select_layers(loaded.model, "all", embeddings=True)
    assert "model.embed_tokens" in sel.skipped and "tied to lm_head.weight" in sel.skipped["model.embed_tokens"]
    assert "lm_head" in sel.skipped
    assert sel.total == LAYERS + 2 and len(sel.chosen) == LAYERS
    # embeddings do not take places in the count; include/exclude apply to them too
    untied = tiny_llama(seed=0).model
    assert [c.name for c in select_layers(untied, 1, embeddings=True).chosen] == ["model.layers.0.self_attn.q_proj", "model.embed_tokens"]
    assert "model.embed_tokens" not in select_layers(untied, 1, embeddings=True, exclude="embed").names


def test_gpt2_position_embeddings_compress_bit_exact():
    model, tok, ref = tiny_gpt2()
    runtime = compress_model(model, make_codec("zstd"), layers="all", policy="none", embeddings=True, progress=False)
    assert [layer.name for layer in runtime.layers][-1] == "transformer.wpe"  # wte is tied to lm_head: skipped
    out = greedy_generate(model, tok, PROMPTS, max_new_tokens=4, min_new_tokens=4)
    assert torch.equal(out.logits, ref.logits)
    assert runtime.stats.decompressions == 9 * 4
