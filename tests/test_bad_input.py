"""Bad input is refused before any phase runs, in one line, and leaves a results.json that says so.

In process (no interpreter start per case): each case runs `experiment.run` on the tiny model and watches the
model load and the phases through spies that call the real functions. The command-line side (exit code 2, at
most 3 lines of output) is held by the subprocess tests in test_cli.py and test_cli_bad_input.py.
"""

from __future__ import annotations

import json

import pytest
from conftest import tiny_run_config

import harness.checks as checks
import harness.experiment as experiment
from harness.errors import HarnessError

# case -> (overrides, what the error says, whether the model must load first to know)
CASES = {
    "too_many_layers": (["compress.layers=100000"], "compress.layers=100000 but only 15 of 15", True),
    "include_matches_nothing": (["compress.include=mlpp"], "compress.include='mlpp' matches no layer", True),
    "exclude_matches_nothing": (["compress.layers=all", "compress.exclude=[lm_head,no_such]"],
                                "compress.exclude='no_such' matches no layer", True),
    "lru_budget_below_largest_layer": (["cache=lru", "cache.budget_mb=0.001", "compress.layers=all"],
                                       "smaller than the largest compressed layer (lm_head", True),
    "bogus_codec": (["compress.codec=bogus_codec"], "unknown codec 'bogus_codec'", False),
    "negative_lru_budget": (["cache=lru", "cache.budget_mb=-5"], "cache.budget_mb=-5 is invalid", False),
    "prefetch_depth_zero": (["cache=prefetch", "cache.depth=0"], "cache.depth=0 is invalid", False),
    "option_the_policy_does_not_take": (["cache=prefetch", "+cache.budget_mb=5"], "cache=prefetch:", False),
    "gpu_placement_with_a_cpu_codec": (["compress.placement=gpu"], "compress.placement=gpu needs a GPU codec", False),
    "bad_placement": (["compress.placement=disk"], "compress.placement='disk' is invalid", False),
    "required_callback_null": (["callbacks.memory=null"], "the phase needs a PhaseMemory", False),
    "callback_not_a_config": (["+callbacks.extra=5"], "callbacks.extra=5 is not a callback config", False),
    "compile_with_a_policy_without_a_compiled_form": (["generate.compile=true", "cache=lru", "cache.budget_mb=10"],
                                                      "cache=lru has no compiled form", False),
    "compile_with_verify_always": (["generate.compile=true", "compress.verify=always"], "verify=always cannot run", False),
    "compile_with_block_ahead": (["generate.compile=true", "cache=block", "cache.ahead=1"], "cache.ahead=1 has no compiled", False),
    "compile_not_a_bool": (["generate.compile=maybe"], "generate.compile='maybe' is invalid", False),
    "fused_with_another_codec": (["cache=fused"], "cache=fused multiplies lut3 weights in its kernel: it needs "
                                 "compress.codec=fused_lut3, not zstd_grouped", False),
    "fused_compiled_with_another_codec": (["cache=fused", "generate.compile=true", "compress.codec=zstd"],
                                          "it needs compress.codec=fused_lut3, not zstd", False),
    "fused_with_embeddings": (["cache=fused", "compress.codec=fused_lut3", "compress.embeddings=true"],
                              "cache=fused serves linear layers only", False),
    "fused_prefill_slices_negative": (["cache=fused", "compress.codec=fused_lut3", "cache.prefill_slices=-1"],
                                      "cache.prefill_slices=-1 is invalid; give 0", False),
    "fused_prefill_tokens_too_many": (["cache=fused", "compress.codec=fused_lut3", "cache.prefill_tokens=40"],
                                      "cache.prefill_tokens=40 is invalid; give 0 (off) to 32", False),
    "fused_prefill_two_ways": (["cache=fused", "compress.codec=fused_lut3", "cache.prefill_tokens=16",
                                "cache.prefill_slices=4"],
                               "cache.prefill_slices=4 and cache.prefill_tokens=16 both", False),
    # prefill_tokens is on by default: slicing alone says how to turn it off
    "fused_prefill_slices_over_the_default": (["cache=fused", "compress.codec=fused_lut3", "cache.prefill_slices=4"],
                                              "to slice, also give cache.prefill_tokens=0 (its default is 32)", False),
    "fused_kernel_unknown": (["cache=fused", "compress.codec=fused_lut3", "cache.kernel=fast"],
                             "cache.kernel='fast' is invalid; valid: auto, lane, ballot, chunk, prefetch", False),
    "fused_pdl_not_a_boolean": (["cache=fused", "compress.codec=fused_lut3", "cache.pdl=sometimes"],
                                "cache.pdl='sometimes' is invalid; give true", False),
    "lut3_with_a_float32_model": (["compress.codec=fused_lut3", "model.dtype=float32"],
                                  "compress.codec=fused_lut3 stores bfloat16 weights only, not float32", False),
}


def cfg_of(tmp_path, overrides):
    return tiny_run_config(tmp_path, *overrides)


@pytest.fixture
def watched(monkeypatch):
    """The real load_model and run_phase, with a record of each call."""
    calls: list[str] = []
    load, phase = experiment.load_model, experiment.run_phase

    def load_model(*args, **kwargs):
        calls.append("load")
        return load(*args, **kwargs)

    def run_phase(name, *args, **kwargs):
        calls.append(name)
        return phase(name, *args, **kwargs)

    monkeypatch.setattr(experiment, "load_model", load_model)
    monkeypatch.setattr(experiment, "run_phase", run_phase)
    return calls


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_fails_before_any_phase(tmp_path, watched, capsys, case):
    overrides, message, needs_model = CASES[case]
    with pytest.raises(HarnessError, match=None) as err:
        experiment.run(cfg_of(tmp_path, overrides), tmp_path / "run", overrides)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert watched == (["load"] if needs_model else []), watched  # refused before the model loads where possible
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["status"] == "failed" and message in res["error"]
    assert not {"baseline", "compressed", "comparison", "layers"} & set(res)  # nothing half-written
    out = capsys.readouterr().out
    assert "RESULTS SUMMARY" not in out and out.strip().splitlines() == [f"results: {tmp_path / 'run' / 'results.json'}"]
    assert not list((tmp_path / "art").glob("*"))  # nothing compressed either


def test_null_optional_callback_is_skipped(tmp_path):
    cfg = cfg_of(tmp_path, ["callbacks.metrics=null"])
    callbacks = checks.make_callbacks(cfg)
    assert [type(c).__name__ for c in callbacks] == ["ForwardPassCounter", "GenerationTimer", "CachePolicyBoundaries",
                                                     "PhaseMemory"]


def test_selection_is_made_once_and_reused(tmp_path, monkeypatch):
    """The layers checked before the baseline are the layers compressed: one selection, passed on."""
    made, passed = [], []
    select, compress = checks.select_layers, experiment.compress_cached

    def select_layers(*args, **kwargs):
        made.append(select(*args, **kwargs))
        return made[-1]

    def compress_cached(*args, **kwargs):
        passed.append(kwargs.get("selection"))
        return compress(*args, **kwargs)

    monkeypatch.setattr(checks, "select_layers", select_layers)
    monkeypatch.setattr(experiment, "compress_cached", compress_cached)
    res = experiment.run(cfg_of(tmp_path, ["compress.layers=3", "compress.order=largest"]), tmp_path / "run", [])
    assert res["status"] == "completed" and len(made) == 1 and passed == made
    assert [row["name"] for row in res["layers"]] == made[0].names
