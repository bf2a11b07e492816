"""eval=fidelity end to end: lm-eval on the baseline and on the compressed model, sample by sample."""

import pytest
from conftest import compose_config

from harness.experiment import run

POLICIES = ["none", "per_forward_pass", "full", "lru", "prefetch", "block"]


def fidelity_run(tmp_path, model_overrides, cache, limit):
    cfg = compose_config(*model_overrides, "logger=none", "eval=fidelity", f"eval.limit={limit}", "compress.layers=all",
                  f"cache={cache}", "generate.max_new_tokens=2", "generate.repeats=1", "device=cpu")
    return run(cfg, tmp_path / cache, overrides=[])


@pytest.mark.parametrize("cache", POLICIES)
def test_every_bundled_task_is_identical_under_every_policy(tmp_path, cache):
    res = fidelity_run(tmp_path, ["model=tiny"], cache, limit=8)
    fid = res["fidelity"]
    assert res["status"] == "completed" and fid["verdict"] == "identical"
    assert set(fid["tasks"]) == {"codecllm_cloze", "codecllm_mc", "codecllm_ppl", "codecllm_qa"}
    for task, t in fid["tasks"].items():
        assert t["samples"] == 8 and t["samples_differing"] == 0 and t["max_abs_loglikelihood_diff"] == 0, task
        assert t["all_prompts_matched"]
    counts = fid["counts"]
    assert counts["baseline"]["forward_passes"] == counts["compressed"]["forward_passes"] > 0
    layers = res["compressed"]["layers_compressed"]
    passes = counts["compressed"]["forward_passes"]
    expected = {"none": layers * passes, "per_forward_pass": layers * passes, "full": layers, "lru": layers,
                "prefetch": layers * passes + 2, "block": layers * passes}
    # lru: conf/cache/lru.yaml's 100 MB holds the whole tiny model, so each layer is decompressed once
    assert counts["compressed"]["decompressions"] == expected[cache]


@pytest.mark.slow
def test_default_model_fidelity_is_identical(tmp_path):
    res = fidelity_run(tmp_path, [], "per_forward_pass", limit=4)
    assert res["status"] == "completed", res["error"]
    assert res["fidelity"]["verdict"] == "identical"
    assert res["comparison"]["outputs_match"]
    assert all(t["max_abs_loglikelihood_diff"] == 0 for t in res["fidelity"]["tasks"].values())
