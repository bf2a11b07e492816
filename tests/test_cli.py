"""`python -m harness` as a user runs it: smoke runs on the tiny model, W&B offline files, bad input."""

import json

from conftest import RunIf

TINY = ["model=tiny", "generate.max_new_tokens=4", "generate.min_new_tokens=4", "generate.repeats=2"]
LINEARS = 15  # tiny Llama: 2 blocks x 7 + lm_head


def test_smoke_run_writes_results_with_exact_counts(harness_cli, tmp_path):
    run_dir = tmp_path / "run"
    # callbacks.metrics=null: a null callback is skipped (it used to end in an AttributeError); with logger=none
    # the metrics callback has nothing to log, so the run measures the same.
    args = [*TINY, "logger=none", "compress.layers=all", "cache=per_forward_pass", "callbacks.metrics=null"]
    # PYTHONPROFILEIMPORTTIME lists every module the run imported (on stderr): what this run does not need must
    # stay out of start-up (W&B with logger=none, lm-eval without eval=fidelity, nvCOMP on the CPU, the reports,
    # and Ray and submitit, which Hydra's scan of hydra_plugins/codecllm_launchers at every start must not import).
    proc = harness_cli([*args, f"hydra.run.dir={run_dir}"], tmp_path, env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" in imported and not imported & {"wandb", "lm_eval", "nvidia.nvcomp", "harness.report", "ray", "submitit"}
    assert "RESULTS SUMMARY" in proc.stdout and "outputs match" in proc.stdout
    res = json.loads((run_dir / "results.json").read_text())
    assert res["status"] == "completed" and res["error"] is None
    for phase in ("baseline", "compressed"):
        for key in ("time_s", "tokens_per_s", "forward_passes", "memory", "output_texts", "output_token_ids"):
            assert key in res[phase], (phase, key)
        assert set(res[phase]["memory"]) >= {"kind", "before_bytes", "after_bytes", "peak_bytes", "delta_bytes"}
        assert res[phase]["forward_passes"] == 4
    comp = res["compressed"]
    for key in ("decompressions", "decompressions_per_forward_pass", "decompress_time_s", "layers_compressed",
                "layers_total", "original_bytes", "compressed_bytes", "compression_ratio", "compress_time_s",
                "peak_resident_decompressed_bytes"):
        assert key in comp, key
    assert comp["layers_compressed"] == comp["layers_total"] == LINEARS
    assert comp["decompressions"] == LINEARS * 4 and comp["decompressions_per_forward_pass"] == LINEARS
    assert comp["counts_consistent"] and comp["original_bytes"] > comp["compressed_bytes"] > 0
    assert set(res["comparison"]) >= {"slowdown", "peak_memory_ratio", "outputs_match", "max_abs_logit_diff"}
    assert res["comparison"]["outputs_match"] is True and res["comparison"]["max_abs_logit_diff"] == 0
    assert res["config"]["model"]["name"] == "tiny" and not (run_dir / "wandb").exists()


def test_wandb_offline_run_files(harness_cli, tmp_path):
    run_dir = tmp_path / "run"
    proc = harness_cli([*TINY, "logger=wandb", "compress.layers=3", "cache=full", f"hydra.run.dir={run_dir}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb")), "no offline W&B run written"
    assert "wandb sync" in proc.stdout
    res = json.loads((run_dir / "results.json").read_text())
    assert res["compressed"]["decompressions"] == 3  # full: once per layer


@RunIf(no_cuda=True)
def test_gpu_preset_without_cuda_is_one_line(harness_cli, tmp_path):
    proc = harness_cli([*TINY, "experiment=gpu", "logger=none", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err_lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(err_lines) == 1 and "is_available() is False" in err_lines[0], proc.stderr[-2000:]
