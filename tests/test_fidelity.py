"""Fidelity check: bundled lm-eval tasks run offline on a tiny random Llama; compare() tells equal from unequal."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

# Read by huggingface_hub/datasets when first imported: before lm_eval comes in.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch
import yaml
from conftest import compose_config, tiny_run_config
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from harness import fidelity
from harness.checks import validate
from harness.errors import HarnessError
from harness.tokenizer import VOCAB_SIZE, byte_tokenizer

REPO = Path(__file__).resolve().parents[1]
LIMIT = 6
EXPECTED_METRICS = {
    "codecllm_cloze": {"acc", "perplexity"},
    "codecllm_mc": {"acc", "acc_norm"},
    "codecllm_ppl": {"word_perplexity", "byte_perplexity", "bits_per_byte"},
    "codecllm_qa": {"exact_match"},
}


def tiny_llama(**overrides) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=512,
        **overrides,
    )
    return LlamaForCausalLM(cfg).to(torch.bfloat16).eval()  # bf16: the dtype the codecs compress


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def base(model, tok):
    return fidelity.evaluate(model, tok, fidelity.DEFAULT_TASKS, limit=LIMIT)


def test_bundled_tasks_return_metrics_and_samples(base):
    assert set(base) == set(EXPECTED_METRICS)
    mc_choices = [len(json.loads(line)["choices"]) for line in (fidelity.TASKS_DIR / "data/mc.jsonl").open()]
    for task, res in base.items():
        assert set(res["metrics"]) == EXPECTED_METRICS[task]
        assert all(isinstance(v, float) for v in res["metrics"].values())
        samples = res["samples"]
        assert [s["doc_id"] for s in samples] == list(range(LIMIT))
        for s in samples:
            n_ll, n_greedy, n_gen = len(s["loglikelihoods"]), len(s["greedy"]), len(s["generations"])
            match res["output_type"]:
                case "loglikelihood":
                    assert (n_ll, n_greedy, n_gen) == (1, 1, 0)
                case "multiple_choice":
                    assert (n_ll, n_greedy, n_gen) == (mc_choices[s["doc_id"]], n_ll, 0)
                case "loglikelihood_rolling":
                    assert (n_ll, n_greedy, n_gen) == (1, 0, 0)
                    assert s["loglikelihoods"][0] < 0
                case "generate_until":
                    assert (n_ll, n_greedy, n_gen) == (0, 0, 1)
                    assert "\n" not in s["generations"][0]  # until ["\n"] cut it
                case other:
                    pytest.fail(f"unexpected output_type {other}")
    json.dumps(base, allow_nan=False)


def test_group_expands_to_the_four_tasks(model, tok):
    res = fidelity.evaluate(model, tok, ["codecllm"], limit=1)
    assert set(res) == set(EXPECTED_METRICS)


def test_same_model_twice_is_identical(model, tok, base):
    again = fidelity.evaluate(model, tok, fidelity.DEFAULT_TASKS, limit=LIMIT)
    cmp = fidelity.compare(base, again)
    assert cmp["verdict"] == "identical"
    for task, t in cmp["tasks"].items():
        assert t["samples"] == LIMIT
        assert t["all_prompts_matched"]
        assert (t["samples_differing"], t["greedy_flags_differing"], t["generations_differing"]) == (0, 0, 0)
        assert t["max_abs_loglikelihood_diff"] == 0.0
        assert set(t["metric_diff"]) == EXPECTED_METRICS[task]
        assert all(d == 0.0 for d in t["metric_diff"].values())
    rows = fidelity.per_sample_table(base, again)
    assert rows and all(r["match"] for r in rows)
    json.dumps([cmp, rows], allow_nan=False)


def _flip_low_bit(model: LlamaForCausalLM, index: tuple = (...,)) -> LlamaForCausalLM:
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.model.layers[1].mlp.down_proj.weight.view(torch.int16)[index] ^= 1
    assert not torch.equal(broken.model.layers[1].mlp.down_proj.weight, model.model.layers[1].mlp.down_proj.weight)
    return broken


def test_perturbed_weight_is_different(model, tok, base):
    # A codec that loses the lowest mantissa bit of one matrix must fail the check.
    broken = fidelity.evaluate(_flip_low_bit(model), tok, fidelity.DEFAULT_TASKS, limit=LIMIT)
    cmp = fidelity.compare(base, broken)
    assert cmp["verdict"] == "different"
    for task in ("codecllm_cloze", "codecllm_mc", "codecllm_ppl"):
        t = cmp["tasks"][task]
        assert t["all_prompts_matched"]
        assert t["max_abs_loglikelihood_diff"] > 0
        assert t["samples_differing"] > 0
    # Perplexities move with any log-likelihood; accuracies need a flipped ranking and may not.
    assert cmp["tasks"]["codecllm_cloze"]["metric_diff"]["perplexity"] != 0
    assert cmp["tasks"]["codecllm_ppl"]["metric_diff"]["bits_per_byte"] != 0
    rows = [r for r in fidelity.per_sample_table(base, broken) if r["task"] == "codecllm_ppl"]
    assert any(not r["match"] and r["abs_diff"] > 0 for r in rows)


def test_one_flipped_bit_is_different(model, tok, base):
    # One low bit of one bf16 weight out of 8192; seen only because log-probs are summed in fp32 (softmax_dtype).
    broken = fidelity.evaluate(_flip_low_bit(model, (3, 5)), tok, ["codecllm_ppl"], limit=LIMIT)
    cmp = fidelity.compare({"codecllm_ppl": base["codecllm_ppl"]}, broken)
    assert cmp["verdict"] == "different"
    assert cmp["tasks"]["codecllm_ppl"]["max_abs_loglikelihood_diff"] > 0


def _flip(results: dict, task: str, key: str, fn) -> dict:
    out = copy.deepcopy(results)
    out[task]["samples"][0][key] = fn(out[task]["samples"][0][key])
    return out


@pytest.mark.parametrize(
    ("task", "key", "fn", "field"),
    [
        ("codecllm_cloze", "loglikelihoods", lambda v: [v[0] + 1e-6], "samples_differing"),
        ("codecllm_mc", "greedy", lambda v: [not v[0], *v[1:]], "greedy_flags_differing"),
        ("codecllm_qa", "generations", lambda v: [v[0] + "x"], "generations_differing"),
    ],
)
def test_compare_counts_each_kind_of_difference(base, task, key, fn, field):
    cmp = fidelity.compare(base, _flip(base, task, key, fn))
    assert cmp["verdict"] == "different"
    assert cmp["tasks"][task][field] == 1
    assert cmp["tasks"][task]["samples_differing"] == 1
    assert cmp["tasks"][task]["all_prompts_matched"]
    assert [r["match"] for r in fidelity.per_sample_table(base, _flip(base, task, key, fn))].count(False) == 1


def test_compare_mismatched_prompts_or_docs_are_different(base):
    other_prompt = _flip(base, "codecllm_ppl", "args_hash", lambda h: "0" * len(h))
    missing_doc = copy.deepcopy(base)
    missing_doc["codecllm_mc"]["samples"].pop()
    missing_task = {k: v for k, v in base.items() if k != "codecllm_qa"}
    for other, task in ((other_prompt, "codecllm_ppl"), (missing_doc, "codecllm_mc"), (missing_task, "codecllm_qa")):
        cmp = fidelity.compare(base, other)
        assert cmp["verdict"] == "different"
        assert not cmp["tasks"][task]["all_prompts_matched"]
        assert cmp["tasks"][task]["samples_differing"] >= 1


@pytest.mark.slow  # an unknown name makes lm-eval index every task it ships (~15 s), as a user's typo would
def test_unknown_task_is_a_one_line_harness_error(model, tok):
    with pytest.raises(HarnessError) as err:
        fidelity.evaluate(model, tok, ["codecllm_clozee"], limit=1)
    msg = str(err.value)
    assert msg.startswith("unknown lm-eval task 'codecllm_clozee'; bundled: codecllm, codecllm_cloze, codecllm_mc")
    assert "Did you mean 'codecllm_cloze'" in msg
    assert "\n" not in msg


def test_include_path_adds_a_task_next_to_the_bundled_ones(model, tok, tmp_path):
    data = tmp_path / "extra.jsonl"
    data.write_text("".join(json.dumps({"q": f"{i} plus one is", "a": str(i + 1)}) + "\n" for i in range(3)))
    (tmp_path / "extra.yaml").write_text(
        yaml.safe_dump(
            {
                "task": "extra_arith",
                "dataset_path": "json",
                "dataset_kwargs": {"data_files": {"test": str(data)}},
                "output_type": "loglikelihood",
                "test_split": "test",
                "doc_to_text": "{{q}}",
                "doc_to_target": "{{a}}",
                "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
            }
        )
    )
    res = fidelity.evaluate(model, tok, ["extra_arith", "codecllm_cloze"], limit=2, include_path=str(tmp_path))
    assert set(res) == {"extra_arith", "codecllm_cloze"}
    assert len(res["extra_arith"]["samples"]) == 2
    assert "acc" in res["extra_arith"]["metrics"]

    with pytest.raises(HarnessError, match="is not a directory"):
        fidelity.evaluate(model, tok, ["codecllm_cloze"], limit=1, include_path=str(data))


class OpaqueLinear(nn.Module):
    """Stands in for a compressed layer: computes a linear map but has no `weight` parameter."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.register_buffer("packed", linear.weight.detach().clone())

    def forward(self, x):
        return nn.functional.linear(x, self.packed)


def test_evaluate_does_not_retie_a_swapped_lm_head(tok):
    # HFLM calls model.tie_weights(); on a tied model that would re-register the dense embedding as lm_head.weight.
    model = tiny_llama(tie_word_embeddings=True)
    model.lm_head = OpaqueLinear(model.lm_head)
    fidelity.evaluate(model, tok, ["codecllm_cloze"], limit=1)
    assert dict(model.lm_head.named_parameters()) == {}
    assert "tie_weights" not in vars(model)  # the shadowing is undone


def test_eval_configs_compose():
    # experiment.py dispatches on eval.name: each option must carry its own name, and every option the same keys
    none, fid = (compose_config(f"eval={n}").eval for n in ("none", "fidelity"))
    assert (none.name, fid.name) == ("none", "fidelity")
    assert none.keys() == fid.keys()
    assert list(fid.tasks) == fidelity.DEFAULT_TASKS
    assert set(fid.tasks) <= set(fidelity.bundled_tasks())


def test_module_imports_without_lm_eval():
    code = "import sys, harness.fidelity; assert 'lm_eval' not in sys.modules and 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_bundled_lm_eval_tasks_validate_without_lm_eval(tmp_path, monkeypatch):
    import harness.fidelity

    def no_index(*_):
        raise AssertionError("lm-eval's task index was built for bundled tasks")

    monkeypatch.setattr(harness.fidelity, "_task_manager", no_index)
    validate(tiny_run_config(tmp_path, "eval=fidelity"))
    validate(tiny_run_config(tmp_path, "eval=fidelity", "eval.tasks=[codecllm]"))
