"""Bad input on the command line: one `error:` line and exit code 2, before Hydra starts the job where it can be;
HYDRA_FULL_ERROR=1 still shows the traceback. The in-process side of validation is in test_bad_input.py."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_refused

from harness.__main__ import unknown_group_option

BAD_INPUT = {
    "unknown_group_option": (["cache=lru2"], "unknown cache option 'lru2'; valid: block, full, fused, lru, none, per_forward_pass, "
                             "prefetch. Did you mean 'lru'?"),
    "unknown_policy": (["cache.name=lru2"], "unknown cache policy 'lru2'"),
    "negative_budget": (["cache=lru", "cache.budget_mb=-5"], "cache.budget_mb=-5 is invalid"),
    "missing_model_path": (["model=hf", "model.name_or_path=/nonexistent/model"],
                           "model path '/nonexistent/model' does not exist"),
    "missing_gguf": (["model=hf", "model.name_or_path={tmp}", "model.gguf_file=missing.gguf"],
                     "gguf_file 'missing.gguf' not found"),
    "unknown_lm_eval_task": (["eval=fidelity", "eval.tasks=[nope]"], "unknown lm-eval task 'nope'"),
    "missing_required_value": (["model=hf"], "model.name_or_path is required"),
    "too_many_layers": (["compress.layers=999"], "use at most 15"),
    "misspelt_codec": (["compress.codec=zstd_grouppd"], "Did you mean 'zstd_grouped'"),
    "zero_budget": (["cache=lru", "cache.budget_mb=0"], "cache.budget_mb=0 is invalid"),
    "cuda_without_cuda": (["device=cuda"], "torch.cuda.is_available() is False"),
    "embeddings_not_a_bool": (["compress.embeddings=maybe"], "compress.embeddings='maybe' is invalid"),
    "include_matches_nothing": (["compress.include=mlpp"], "compress.include='mlpp' matches no layer"),  # after the load
    "required_callback_off": (["callbacks.timer=null"], "the phase needs a GenerationTimer"),
    "zero_rounds": (["generate.rounds=0"], "generate.rounds=0 is invalid"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_on_the_command_line_is_one_line_and_exit_2(harness_cli, tmp_path, case):
    overrides, message = BAD_INPUT[case]
    if case == "cuda_without_cuda" and torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    overrides = [o.format(tmp=tmp_path) for o in overrides]
    model = [] if "model=hf" in overrides else ["model=tiny"]
    run_dir = tmp_path / "run"
    proc = harness_cli([*model, "logger=none", *overrides, f"hydra.run.dir={run_dir}"], tmp_path)
    error = assert_refused(proc, message)
    if case == "unknown_group_option":  # refused before Hydra starts the job: no run dir
        assert not run_dir.exists() and proc.stderr.strip() == error
    elif case == "missing_required_value":  # refused before the config resolves: nothing to record
        assert not (run_dir / "results.json").exists()
    else:
        res = json.loads((run_dir / "results.json").read_text())
        assert res["status"] == "failed" and message in res["error"] and "baseline" not in res


def test_hydra_full_error_shows_the_traceback(harness_cli, tmp_path):
    proc = harness_cli(["model=tiny", "logger=none", "cache.name=lru2", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path,
                       env={"HYDRA_FULL_ERROR": "1"})
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "unknown cache policy 'lru2'" in proc.stderr


def test_unknown_group_option_check_leaves_the_rest_to_hydra():
    assert unknown_group_option(["cache=lru", "model=tiny", "experiment=prototype", "compress.layers=3"]) is None
    assert unknown_group_option(["-m", "cache=lru,full", "model=choice(tiny,hf)", "cache=glob(*)"]) is None
    assert unknown_group_option(["hydra/launcher=joblib", "+experiment=prototype", "~experiment", "cachee=x"]) is None
    assert "unknown cache option 'ful'" in unknown_group_option(["-m", "cache=lru,ful"])
    assert "unknown model option 'smol'" in unknown_group_option(["model=choice(tiny,smol)"])
    assert "unknown experiment option 'x'" in unknown_group_option(["+experiment=x"])
    assert unknown_group_option(["--config-dir=/elsewhere", "cache=mine"]) is None  # options may live there
    assert unknown_group_option(["cache=(unbalanced"]) is None  # a syntax error: Hydra explains it
