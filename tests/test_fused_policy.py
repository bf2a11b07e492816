"""cache=fused on the CPU: decode (lut3.decode) + F.linear, so outputs equal dense bit for bit; exact counts,
eager and compiled; the lossless check; token agreement; what cannot run is refused before the model loads.
The CUDA kernel path (in-kernel decodes, the exactness reference) is in tests/test_gpu.py."""

from __future__ import annotations

import copy
import inspect
import json

import pytest
import torch
from conftest import CONF, assert_refused
from omegaconf import OmegaConf
from transformers import GPT2Config, GPT2LMHeadModel

from harness.codecs import make_codec
from harness.errors import HarnessError
from harness.exactness import exactness_reference, token_agreement
from harness.generation import greedy_generate
from harness.phases.compiled import compile_mode, release_compiled, reset_compile_counters
from harness.phases.module import GenerationModule
from harness.runtime import compress_model
from harness.runtime.fused import Fused, check_setup
from harness.runtime.stats import Stats

PROMPTS = ["The capital of France is", "Lossless"]
NEW = 5
LAYERS = 2 * 7 + 1  # tiny Llama: 2 blocks x 7 linear layers + the untied lm_head


def generate(model, tokenizer, compile=False, deterministic=False):
    return greedy_generate(model, tokenizer, PROMPTS, max_new_tokens=NEW, min_new_tokens=NEW, compile=compile,
                           deterministic=deterministic)  # fmt: skip


@pytest.fixture(scope="module")
def dense(tiny_dense, tiny_reference):
    return tiny_dense, tiny_reference(PROMPTS, NEW)


def fused_copy(loaded, **kw):
    model = copy.deepcopy(loaded.model)
    return model, compress_model(model, make_codec("fused_lut3"), policy="fused", layers="all", progress=False, **kw)


def test_outputs_equal_dense_with_exact_counts(dense):
    """On the CPU every pass decodes every layer (L x P decompressions, none in-kernel); each generation the same."""
    loaded, ref = dense
    model, runtime = fused_copy(loaded)
    assert runtime.lossless() == {"weights_lossless": True, "weights_checked_layers": LAYERS}  # checked at start
    for _ in range(2):
        runtime.reset_stats()
        out = generate(model, loaded.tokenizer)
        runtime.end_generation()
        assert out.new_token_ids == ref.new_token_ids and torch.equal(out.logits, ref.logits)
        s = runtime.stats.snapshot()
        assert s["forward_passes"] == NEW and s["decompressions_per_pass"] == [LAYERS] * NEW
        assert s["decompressions_per_layer"] == {layer.name: NEW for layer in runtime.layers}
        assert s["bytes_decompressed"] == NEW * runtime.report.original_bytes
        assert (
            s["in_kernel_decodes"] == 0 and s["in_kernel_decodes_per_pass"] == [0] * NEW and s["in_kernel_tiles"] == 0
        )
        largest = max(layer.weight_nbytes for layer in runtime.layers)
        assert s["peak_resident_decompressed_bytes"] == largest  # one layer's weight at a time
    module = GenerationModule(model, loaded.tokenizer, NEW, NEW)
    assert exactness_reference(module, runtime, PROMPTS, out) is None  # no kernel of its own on the CPU
    module.close()
    runtime.close()


def test_verify_never_leaves_losslessness_unestablished(dense):
    _, runtime = fused_copy(dense[0], verify="never")
    assert runtime.lossless() == {"weights_lossless": None, "weights_checked_layers": 0}
    runtime.close()


def test_compiled_counts_and_outputs_equal_the_eager_policy(dense):
    """generate.compile=true on the CPU: the decode steps are traced, so their decodes run in the opaque op
    codecllm::lut3_dense and are counted on the device. Logits bit-exact with the compiled dense model, and the
    same counts as eager. The compressed side compiles as the harness compiles a phase with an exactness reference:
    in Inductor's deterministic mode (the dense side in the default mode)."""
    loaded, _ = dense
    ref = generate(loaded.model, loaded.tokenizer, compile=True)
    release_compiled(loaded.model)
    model, runtime = fused_copy(loaded, captured=True)
    module = GenerationModule(model, loaded.tokenizer, NEW, NEW, compile=True)
    assert not module.deterministic_compile  # the baseline phase: no runtime yet
    module.runtime = runtime
    assert module.deterministic_compile
    module.close()
    reset_compile_counters()
    try:
        for _ in range(2):
            runtime.reset_stats()
            out = generate(model, loaded.tokenizer, compile=True, deterministic=True)
            runtime.end_generation()
            assert out.new_token_ids == ref.new_token_ids and torch.equal(out.logits, ref.logits)
            s = runtime.stats.snapshot()
            assert s["decompressions_per_pass"] == [LAYERS] * NEW
            assert s["decompressions_per_layer"] == {layer.name: NEW for layer in runtime.layers}
            assert s["bytes_decompressed"] == NEW * runtime.report.original_bytes
            assert s["decompress_time_s"] is None  # decodes inside compiled steps are not host-timed
        assert compile_mode(torch.device("cpu")) == "inductor"  # really compiled
    finally:
        runtime.close()
        release_compiled(model)


def test_in_kernel_counts_land_in_their_passes():
    """Stats.add_in_kernel, as the policy feeds it from the device counts: launches per pass and per layer, and
    tiles = launches x the layer's tiles."""

    class Layer:
        def __init__(self, name):
            self.name = name

    stats = Stats()
    for _ in range(3):
        stats.begin_pass()
    layers = [Layer("a"), Layer("b")]
    stats.add_in_kernel([[0, 0], [1, 1], [2, 1]], layers, tiles=[4, 17])
    s = stats.snapshot()
    assert s["in_kernel_decodes_per_pass"] == [0, 2, 3] and s["in_kernel_decodes"] == 5
    assert s["in_kernel_decodes_per_layer"] == {"a": 3, "b": 2} and s["in_kernel_tiles"] == 3 * 4 + 2 * 17
    with pytest.raises(RuntimeError, match="4 passes"):
        stats.add_in_kernel([[0, 0]] * 4, layers, tiles=[4, 17])


def test_token_agreement():
    assert token_agreement([[1, 2, 3], [4, 5]], [[1, 2, 3], [4, 5]]) == 1.0
    assert token_agreement([[1, 2, 3, 4]], [[1, 9, 3, 4]]) == 0.75  # position by position
    assert token_agreement([[1, 2, 3, 4]], [[1, 2]]) == 0.5  # a missing token is a difference
    assert token_agreement([[]], [[]]) is None


def test_what_it_cannot_run_is_refused(dense):
    loaded, _ = dense
    with pytest.raises(HarnessError, match="cache=fused .* needs compress.codec=fused_lut3, not zstd_grouped"):
        compress_model(
            copy.deepcopy(loaded.model), make_codec("zstd_grouped"), policy="fused", layers=2, progress=False
        )
    with pytest.raises(HarnessError, match="use compress.embeddings=false"):
        compress_model(copy.deepcopy(loaded.model), make_codec("fused_lut3"), policy="fused", layers=2,
                       embeddings=True, progress=False)  # fmt: skip
    with pytest.raises(HarnessError, match="cache=fused on CUDA reads the compressed bytes from VRAM"):
        check_setup("fused_lut3", "cpu", torch.device("cuda"), embeddings=False)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=2, n_positions=64, vocab_size=259)).to(
        torch.bfloat16
    )
    with pytest.raises(HarnessError, match=r"transformer.h.0.attn.c_attn is a transposed Conv1D"):
        compress_model(gpt2, make_codec("fused_lut3"), policy="fused", layers="all", progress=False)


def test_cli_run_on_the_cpu(harness_cli, tmp_path):
    """`python -m harness model=tiny compress.codec=fused_lut3 cache=fused compress.layers=all logger=none`."""
    run_dir = tmp_path / "run"
    proc = harness_cli(["model=tiny", "compress.codec=fused_lut3", "cache=fused", "compress.layers=all", "logger=none",
                        "generate.max_new_tokens=4", "generate.min_new_tokens=4", "generate.repeats=2",
                        f"hydra.run.dir={run_dir}", f"compress.artifact_dir={tmp_path / 'art'}"], tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((run_dir / "results.json").read_text())
    comp, cmp_ = res["compressed"], res["comparison"]
    assert res["status"] == "completed" and comp["layers_compressed"] == LAYERS
    assert comp["decompressions_per_pass"] == [LAYERS] * 4 and comp["in_kernel_decodes"] == 0
    assert cmp_["outputs_match"] is True and cmp_["max_abs_logit_diff"] == 0 and cmp_["token_agreement"] == 1.0
    assert cmp_["weights_lossless"] is True and cmp_["weights_checked_layers"] == LAYERS
    assert cmp_["exactness_reference"] is None  # CPU: no kernel of its own
    assert "weights lossless            ✓  (15/15 layers" in proc.stdout and "token agreement" in proc.stdout


def test_cli_refuses_a_non_bf16_model_in_one_line(harness_cli, tmp_path):
    """Exit 2, one line; test_bad_input.py holds the in-process cases that watch the model load."""
    run_dir = tmp_path / "run"
    proc = harness_cli(["model=tiny", "logger=none", "compress.codec=fused_lut3", "model.dtype=float32",
                        f"hydra.run.dir={run_dir}"], tmp_path)  # fmt: skip
    assert_refused(
        proc, "compress.codec=fused_lut3 stores bfloat16 weights only, not float32; use model.dtype=bfloat16"
    )
    res = json.loads((run_dir / "results.json").read_text())
    assert res["status"] == "failed" and "baseline" not in res


def test_a_reference_run_leaves_the_next_generations_counts_exact(dense):
    """reference() counts nothing: a generation inside it (as harness.exactness runs one after the measured phase)
    must leave no pass marks behind for the next measured generation's counts."""
    loaded, ref = dense
    model, runtime = fused_copy(loaded)
    with runtime.policy.reference():
        inside = generate(model, loaded.tokenizer)
    assert torch.equal(inside.logits, ref.logits)  # on the CPU: F.linear on the reference's own W
    runtime.reset_stats()
    out = generate(model, loaded.tokenizer)
    runtime.end_generation()
    s = runtime.stats.snapshot()
    assert torch.equal(out.logits, ref.logits)
    assert s["forward_passes"] == NEW and s["in_kernel_decodes_per_pass"] == [0] * NEW
    assert s["decompressions_per_pass"] == [LAYERS] * NEW
    runtime.close()


def test_the_config_and_the_policy_default_alike():
    """conf/cache/fused.yaml (what `cache=fused` runs) and the policy's constructor (what compress_model(policy=
    "fused") builds, as the benches and tests do) give every option the same default: a default changed in one
    place only would make the benches time another route than the CLI runs."""
    conf = OmegaConf.load(CONF / "cache" / "fused.yaml")
    options = {k: v for k, v in OmegaConf.to_container(conf).items() if not k.startswith("_") and k != "name"}
    params = inspect.signature(Fused.__init__).parameters
    assert options and options == {name: params[name].default for name in options}
    assert set(options) == set(params) - {"self", "runtime"}
