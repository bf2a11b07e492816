"""Paired rounds: the arithmetic (per-round ratios, median, quartiles, rotation), the dense twin the baseline side
runs (rebuilt by decoding, bit-identical, uncompressed parameters shared), the rounds on the tiny model (counts
per generation whatever R is, warm-up before round 1), and what a run writes (keys, memory per side, the
`compress.layers=0` control)."""

import copy

import pytest
import torch
from conftest import compose_config
from torch import nn

from harness.checks import AUTO_ROUNDS, rounds_of, validate
from harness.codecs import make_codec
from harness.errors import HarnessError
from harness.experiment import run
from harness.models import tiny_llama
from harness.phases import callbacks as cb
from harness.phases.module import GenerationModule
from harness.phases.paired import SAME_MODEL, TWO_MODELS, dense_twin, rounds_warmup, run_rounds
from harness.report.collect import job_row
from harness.report.tables import to_markdown
from harness.results import summary_table
from harness.rounds import alternate, paired_speed_ratio, quartiles
from harness.runtime import CompressedLinear, compress_model
from harness.schema import undeclared
from harness.tracking import _flat, rounds_table

PROMPTS = ["The capital of France is"]
NEW = 4
LINEARS = 15  # tiny Llama: 2 blocks x 7 + the untied lm_head


def callbacks():
    return [cb.ForwardPassCounter(), cb.GenerationTimer(), cb.CachePolicyBoundaries(), cb.PhaseMemory()]


# -- the arithmetic ------------------------------------------------------------------------------------------
def test_ratio_per_round_median_and_quartiles():
    r = paired_speed_ratio([1.0, 2.0, 3.0, 4.0, 5.0], [2.0] * 5)
    assert r["speed_ratio_per_round"] == [0.5, 1.0, 1.5, 2.0, 2.5]  # baseline / compressed, round by round
    assert (r["speed_ratio_q1"], r["speed_ratio"], r["speed_ratio_q3"], r["rounds"]) == (1.0, 1.5, 2.0, 5)
    # Pairing is by round, not by sorted times: the same times paired differently give another ratio.
    assert paired_speed_ratio([1.0, 3.0], [1.0, 3.0])["speed_ratio"] == 1.0
    assert paired_speed_ratio([1.0, 3.0], [3.0, 1.0])["speed_ratio"] != 1.0
    with pytest.raises(ValueError):
        paired_speed_ratio([1.0, 2.0], [1.0])
    assert quartiles([7.0]) == (7.0, 7.0, 7.0)


def test_order_rotates_every_round():
    assert alternate(["baseline", "compressed"], 3) == [["baseline", "compressed"], ["compressed", "baseline"],
                                                        ["baseline", "compressed"]]


# -- the dense twin -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pair():
    """The tiny model compressed in place (every linear layer), and a copy of its dense original."""
    loaded = tiny_llama(seed=0)
    original = copy.deepcopy(loaded.model)
    runtime = compress_model(loaded.model, make_codec("zstd_grouped"), layers="all", attach=False, progress=False)
    yield loaded, original, runtime
    runtime.close()


def test_twin_is_dense_bit_identical_and_shares_the_rest(pair):
    loaded, original, runtime = pair
    twin = dense_twin(loaded.model, runtime)
    assert twin is not loaded.model
    dense = dict(original.named_modules())
    for layer in runtime.layers:
        rebuilt = twin.get_submodule(layer.name)
        assert type(rebuilt) is nn.Linear and torch.equal(rebuilt.weight, dense[layer.name].weight)
        assert isinstance(loaded.model.get_submodule(layer.name), CompressedLinear)  # the compressed side untouched
    # never-compressed tensors are the same objects: the twin costs only the decoded layers
    assert twin.model.embed_tokens.weight is loaded.model.model.embed_tokens.weight
    assert twin.model.norm.weight is loaded.model.model.norm.weight
    assert not twin._forward_pre_hooks and not twin._forward_hooks
    with torch.inference_mode():
        ids = loaded.tokenizer(PROMPTS, return_tensors="pt")["input_ids"]
        assert torch.equal(twin(ids).logits, original(ids).logits)


def test_nothing_compressed_both_sides_are_one_model():
    loaded = tiny_llama(seed=0)
    runtime = compress_model(loaded.model, make_codec("zstd_grouped"), layers=0, attach=False, progress=False)
    assert dense_twin(loaded.model, runtime) is loaded.model  # the control runs the same module objects
    assert dense_twin(loaded.model, None) is loaded.model


# -- the rounds -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rounds", [1, 3])
def test_counts_per_generation_whatever_the_rounds(pair, rounds):
    loaded, _, runtime = pair
    twin = dense_twin(loaded.model, runtime)
    modules = {"baseline": GenerationModule(twin, loaded.tokenizer, NEW, NEW),
               "compressed": GenerationModule(loaded.model, loaded.tokenizer, NEW, NEW)}
    modules["compressed"].runtime = runtime
    try:
        res = run_rounds(modules, {s: callbacks() for s in modules}, PROMPTS, rounds, rounds_warmup(1, False), "cpu",
                         TWO_MODELS)
    finally:
        for m in modules.values():
            m.close()
    d = res.as_dict()
    assert d["rounds"] == rounds and len(d["speed_ratio_per_round"]) == rounds and d["outputs_match"]
    for side in ("baseline", "compressed"):
        assert d[side]["forward_passes"] == [NEW] * rounds  # one forward pass per token, in every round
        assert len(d[side]["times_s"]) == rounds and d[side]["gpu_time_s"] is None  # no device clock on the CPU
        # warm-up by design: each side's first generation is untimed, so round 1 pays no first-call costs
        assert res.records[side].warmup == [True] + [False] * rounds
    assert d["compressed"]["decompressions"] == [LINEARS * NEW] * rounds and "decompressions" not in d["baseline"]
    assert d["speed_ratio_per_round"] == [b / c for b, c in zip(d["baseline"]["times_s"], d["compressed"]["times_s"],
                                                                strict=True)]
    assert d["orders"] == alternate(["baseline", "compressed"], 1 + rounds)[1:]


def test_warmup_count_covers_compilation():
    assert rounds_warmup(0, False) == 1  # eager: one untimed generation per side
    assert rounds_warmup(0, True) == 2  # compiled: dynamo compiles in one step, graphs record in a later one
    assert rounds_warmup(3, True) == 3  # generate.warmup, if larger, wins


# -- config and results ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [0, -2, "many", True, 1.5])
def test_bad_rounds_fail_before_the_model_loads(value):
    cfg = compose_config(f"generate.rounds={str(value).lower() if isinstance(value, bool) else value}")
    with pytest.raises(HarnessError, match="generate.rounds=.* is invalid"):
        validate(cfg)


def test_rounds_default_by_device():
    assert rounds_of(compose_config("device=cpu")) == AUTO_ROUNDS["cpu"] >= 3
    assert AUTO_ROUNDS["cuda"] >= 5
    assert rounds_of(compose_config("device=cpu", "generate.rounds=7")) == 7


TINY = ["model=tiny", "logger=none", "device=cpu", f"generate.max_new_tokens={NEW}", f"generate.min_new_tokens={NEW}",
        "generate.repeats=2", "generate.rounds=3", "compress.artifact_cache=false"]


def test_run_writes_paired_figures_and_honest_memory(tmp_path):
    res = run(compose_config(*TINY, "compress.layers=all"), tmp_path, [])
    cmp_, rounds = res["comparison"], res["rounds"]
    assert res["status"] == "completed" and cmp_["rounds_mechanism"] == TWO_MODELS == rounds["mechanism"]
    for key in ("speed_ratio", "speed_ratio_q1", "speed_ratio_q3", "rounds", "slowdown", "peak_memory_ratio",
                "weights_bytes_ratio", "outputs_match", "sequential_speed_ratio"):
        assert key in cmp_, key
    assert cmp_["rounds"] == 3 and cmp_["speed_ratio_q1"] <= cmp_["speed_ratio"] <= cmp_["speed_ratio_q3"]
    assert cmp_["slowdown"] == pytest.approx(1 / cmp_["speed_ratio"]) and cmp_["rounds_outputs_match"]
    for phase in ("baseline", "compressed"):
        assert {"time_s", "gpu_time_s", "host_overhead_s"} <= set(res[phase])
    # Memory per side stays the sequential phases' figure: the twin is built after both, so the compressed
    # phase held its compressed bytes and nothing of the twin's dense layers.
    base_w, comp_w = res["baseline"]["memory"]["weights_bytes"], res["compressed"]["memory"]["weights_bytes"]
    assert comp_w == base_w - res["compressed"]["original_bytes"] + res["compressed"]["compressed_bytes"]
    assert undeclared(res) == []  # every key the run wrote is a harness.schema field
    text = summary_table(res)
    assert "3 paired rounds" in text and f"IQR {cmp_['speed_ratio_q1']:.3f}-{cmp_['speed_ratio_q3']:.3f}" in text
    assert [r["round"] for r in rounds_table(rounds)] == [1, 2, 3]
    assert {"comparison/speed_ratio_q1", "rounds/baseline/time_s"} <= set(_flat({"comparison": cmp_, "rounds": rounds}))
    row = job_row(tmp_path, tmp_path)
    assert row["speed_ratio"] == cmp_["speed_ratio"] and row["rounds"] == 3
    assert f"[{cmp_['speed_ratio_q1']:.2f}-{cmp_['speed_ratio_q3']:.2f}]" in to_markdown([row])


def test_layers_0_control_runs_one_model_near_1(tmp_path):
    res = run(compose_config(*TINY, "compress.layers=0", "generate.rounds=5"), tmp_path, [])
    assert res["comparison"]["rounds_mechanism"] == SAME_MODEL
    # Same module objects, alternated: only noise separates the sides. A loose bound, so a busy host cannot
    # flake it; the mechanism above is the exact check.
    assert 0.5 < res["comparison"]["speed_ratio"] < 2.0
