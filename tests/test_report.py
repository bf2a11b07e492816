"""Sweep report: rows from hand-written results.json files, the written files, the CLI, the dashboard in a
real browser, the Hydra callbacks in real multiruns, and the per-job GPU assignment."""

from __future__ import annotations

import csv
import fcntl
import itertools
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from conftest import RunIf, pythonpath
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import RunMode
from matplotlib.image import imread
from omegaconf import OmegaConf

import harness.sweep_callback as sweep_callback
from harness.report import COLUMNS, collect, write_report
from harness.report.plots import layers_x, render_plots
from harness.sweep_callback import SweepReport, assign_gpu

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
PLOT_STEMS = ["memory_vs_layers", "throughput_vs_layers", "decompressions_vs_layers", "compression_ratio_vs_layers"]
GIB = 2**30


def make_results(job: int, layers: int | str, cache: str) -> dict:
    """A results.json following the run's schema; numbers differ per job so a mixed-up row cannot pass."""
    n = 0 if layers == 0 else 30 if layers == "all" else int(layers)
    passes = 24 + job
    decompressions = n * passes if cache == "per_forward_pass" else n * passes * 7
    memory = lambda peak: {  # noqa: E731
        "kind": "cuda",
        "before_bytes": 1 * GIB,
        "after_bytes": 1 * GIB + 10,
        "peak_bytes": peak,
        "delta_bytes": peak - GIB,
    }
    base_tok_s = 20.0 + job / 10
    comp_tok_s = base_tok_s / (1.0 + n * (0.5 if cache == "per_forward_pass" else 1.0) + job / 100)
    base_peak, comp_peak = 2 * GIB + job * 1000, 2 * GIB - n * 10_000_000 + job * 777
    generated = {"output_texts": [" Paris."], "output_token_ids": [[7042, 30]]}
    return {
        "status": "completed",
        "error": None,
        "config": {
            "model": {"name": "smollm2-135m", "kind": "hf"},
            "compress": {"layers": layers, "order": "largest", "codec": "zstd", "level": 3, "placement": "cpu"},
            "cache": {"name": cache, "budget_mb": None, "depth": 1},
            "generate": {"max_new_tokens": 24},
            "eval": {"name": "none"},
            "logger": {"name": "none"},
            "device": "cuda",
        },
        "overrides": [f"compress.layers={layers}", f"cache={cache}", "generate.max_new_tokens=24"],
        "baseline": {
            "time_s": 1.2,
            "time_s_min": 1.1,
            "time_s_max": 1.3,
            "tokens_per_s": base_tok_s,
            "forward_passes": passes,
            "memory": memory(base_peak),
            **generated,
        },
        "compressed": {
            "time_s": 5.0,
            "time_s_min": 4.9,
            "time_s_max": 5.2,
            "tokens_per_s": comp_tok_s,
            "forward_passes": passes,
            "memory": memory(comp_peak),
            **generated,
            "decompressions": decompressions,
            "decompressions_per_forward_pass": decompressions / passes,
            "decompress_time_s": 0.01 * decompressions,
            "layers_compressed": n,
            "layers_total": 211,
            "original_bytes": n * 1_000_000,
            "compressed_bytes": n * 710_000,
            "compression_ratio": 1.408 + job / 1000 if n else None,
            "compress_time_s": 0.5,
            "peak_resident_decompressed_bytes": 3_000_000 if n else 0,
        },
        "comparison": {
            "slowdown": base_tok_s / comp_tok_s,
            "peak_memory_ratio": comp_peak / base_peak,
            "outputs_match": job != 3,  # one mismatch, so the dashboard's "NO" path is exercised
            "max_abs_logit_diff": 0.0,
        },
        "fidelity": {"verdict": "identical", "tasks": {}},
    }


def write_job(sweep_dir: Path, job: int, results: dict | None, overrides: list[str], config: dict) -> Path:
    """A job dir as Hydra leaves it: .hydra/{overrides,config,hydra}.yaml, plus results.json if it got that far."""
    job_dir = sweep_dir / str(job)
    (job_dir / ".hydra").mkdir(parents=True)
    (job_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (job_dir / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"job": {"num": job}}}))
    if results is not None:
        (job_dir / "results.json").write_text(json.dumps(results, indent=2))
    return job_dir


@pytest.fixture
def sweep(tmp_path: Path) -> tuple[Path, dict[int, dict]]:
    """2x2 sweep (layers 0/20 x cache none/per_forward_pass) plus job 4, which died before results.json."""
    sweep_dir = tmp_path / "multirun" / "2025-01-01" / "12-00-00"
    expected = {}
    for job, (layers, cache) in enumerate(itertools.product([0, 20], ["none", "per_forward_pass"])):
        res = make_results(job, layers, cache)
        write_job(sweep_dir, job, res, res["overrides"], res["config"])
        expected[job] = res
    crashed = make_results(4, 20, "prefetch")
    write_job(sweep_dir, 4, None, crashed["overrides"], crashed["config"])
    (sweep_dir / "multirun.yaml").write_text("hydra: {}\n")
    return sweep_dir, expected


def test_collect_rows_equal_results(sweep):
    sweep_dir, expected = sweep
    rows = collect(sweep_dir)
    assert [r["job"] for r in rows] == [0, 1, 2, 3, 4]
    for row in rows[:4]:
        res = expected[row["job"]]
        base, comp, cmp = res["baseline"], res["compressed"], res["comparison"]
        assert set(row) == set(COLUMNS)
        assert row["job_dir"] == str(row["job"])
        assert row["overrides"] == " ".join(res["overrides"])
        assert (row["status"], row["error"]) == ("completed", None)
        assert (row["model"], row["codec"], row["cache"]) == ("smollm2-135m", "zstd", res["config"]["cache"]["name"])
        assert row["layers"] == res["config"]["compress"]["layers"]
        assert row["layers_compressed"] == comp["layers_compressed"]
        assert row["layers_total"] == comp["layers_total"] == 211
        assert row["baseline_tok_s"] == base["tokens_per_s"]
        assert row["compressed_tok_s"] == comp["tokens_per_s"]
        assert row["slowdown"] == cmp["slowdown"]
        assert row["memory_kind"] == "cuda"
        assert row["baseline_peak_bytes"] == base["memory"]["peak_bytes"]
        assert row["compressed_peak_bytes"] == comp["memory"]["peak_bytes"]
        assert row["peak_memory_ratio"] == cmp["peak_memory_ratio"]
        assert row["compression_ratio"] == comp["compression_ratio"]
        assert row["forward_passes"] == comp["forward_passes"]
        assert row["decompressions"] == comp["decompressions"]
        assert row["decompressions_per_forward_pass"] == comp["decompressions_per_forward_pass"]
        assert row["outputs_match"] is cmp["outputs_match"]
        assert row["fidelity"] == "identical"


def test_job_without_results_is_a_failed_row(sweep):
    sweep_dir, _ = sweep
    row = collect(sweep_dir)[-1]
    assert (row["job"], row["status"]) == (4, "failed")
    assert "no results.json" in row["error"]
    # What it was running comes from Hydra's .hydra/ files.
    assert row["overrides"] == "compress.layers=20 cache=prefetch generate.max_new_tokens=24"
    assert (row["cache"], row["layers"], row["model"]) == ("prefetch", 20, "smollm2-135m")
    assert row["compressed_tok_s"] is None and row["slowdown"] is None


def test_partial_and_unreadable_results_are_failed_rows(tmp_path):
    res = make_results(0, 20, "none")
    partial = {k: res[k] for k in ("config", "overrides", "baseline")} | {"status": "failed", "error": "CUDA OOM"}
    write_job(tmp_path, 0, partial, res["overrides"], res["config"])
    broken = write_job(tmp_path, 1, None, res["overrides"], res["config"])
    (broken / "results.json").write_text('{"status": "compl')
    rows = collect(tmp_path)
    assert [(r["status"], r["error"]) for r in rows][0] == ("failed", "CUDA OOM")
    assert rows[0]["baseline_tok_s"] == res["baseline"]["tokens_per_s"]
    assert rows[0]["compressed_tok_s"] is None and rows[0]["decompressions"] is None
    assert rows[1]["status"] == "failed" and rows[1]["error"].startswith("results.json unreadable")


def test_write_report_files(sweep):
    sweep_dir, expected = sweep
    paths = write_report(sweep_dir)
    assert set(paths) == {"csv", "md", "html", *PLOT_STEMS}
    assert all(p.parent == sweep_dir and p.stat().st_size > 0 for p in paths.values())

    with paths["csv"].open() as f:
        table = list(csv.DictReader(f))
    assert [int(r["job"]) for r in table] == [0, 1, 2, 3, 4]
    assert list(table[0]) == COLUMNS
    for r in table[:4]:
        res = expected[int(r["job"])]
        assert float(r["compressed_tok_s"]) == res["compressed"]["tokens_per_s"]
        assert int(r["compressed_peak_bytes"]) == res["compressed"]["memory"]["peak_bytes"]
    assert table[4]["status"] == "failed" and table[4]["compressed_tok_s"] == ""

    md = paths["md"].read_text().splitlines()
    job_lines = [line for line in md if re.match(r"\| \d+ \|", line)]
    assert len(job_lines) == 5
    assert "| failed |" in job_lines[4] and "no results.json" in job_lines[4]
    # The shared override is stated once, below the table, not repeated per row.
    assert "generate.max_new_tokens=24" not in job_lines[0]
    assert any("generate.max_new_tokens=24" in line for line in md)

    for stem in PLOT_STEMS:
        image = imread(paths[stem])
        assert image.shape[0] > 200 and image.shape[1] > 300

    html = paths["html"].read_text()
    assert len(re.findall(r'<tr class="job ', html)) == 5
    assert len(re.findall(r'<tr class="job failed"', html)) == 1
    assert html.count('src="data:image/png;base64,') == len(PLOT_STEMS)
    assert str(sweep_dir.resolve()) in html
    assert "http://" not in html and "https://" not in html  # self-contained: nothing to fetch


def test_plots_cope_with_one_job_all_layers_and_missing_values(tmp_path):
    res = make_results(0, "all", "per_forward_pass")
    write_job(tmp_path / "one", 0, res, res["overrides"], res["config"])
    write_job(tmp_path / "mixed", 0, res, res["overrides"], res["config"])
    crashed = make_results(1, 20, "none")
    write_job(tmp_path / "mixed", 1, None, crashed["overrides"], crashed["config"])
    all_crashed = make_results(2, "all", "none")
    write_job(tmp_path / "nothing", 2, None, all_crashed["overrides"], all_crashed["config"])

    one = collect(tmp_path / "one")
    assert one[0]["layers"] == "all" and layers_x(one[0]) == 30  # "all" plots at the count it resolved to
    assert layers_x(collect(tmp_path / "nothing")[0]) is None
    for name in ("one", "mixed", "nothing"):
        pngs = render_plots(collect(tmp_path / name))
        assert list(pngs) == PLOT_STEMS
        assert all(png.startswith(b"\x89PNG\r\n\x1a\n") for png in pngs.values())
        assert set(write_report(tmp_path / name)) == {"csv", "md", "html", *PLOT_STEMS}


def test_cli_rebuilds_report(sweep):
    sweep_dir, _ = sweep
    proc = _cli(sweep_dir)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("| job | overrides | status |")
    assert f"html: {sweep_dir / 'dashboard.html'}" in proc.stdout
    assert (sweep_dir / "dashboard.html").exists()


@pytest.mark.parametrize("make_dir", [False, True], ids=["missing-dir", "dir-without-jobs"])
def test_cli_bad_dir_exits_2(tmp_path, make_dir):
    target = tmp_path / "nope"
    if make_dir:
        target.mkdir()
    proc = _cli(target)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ") and "nope" in proc.stderr


def _cli(sweep_dir: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": pythonpath()}
    cmd = [sys.executable, "-m", "harness.report", str(sweep_dir)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.slow
@RunIf(chromium=True)
def test_dashboard_in_headless_chromium(sweep, tmp_path):
    sweep_dir, _ = sweep
    html = write_report(sweep_dir)["html"]
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        "--virtual-time-budget=5000",
    ]
    proc = subprocess.run(
        [str(CHROMIUM), *flags, "--dump-dom", html.as_uri()], capture_output=True, text=True, timeout=120
    )
    dom = proc.stdout
    assert "</html>" in dom, proc.stderr[-2000:]
    # The dashboard's own load handler counted images with complete && naturalWidth > 0.
    assert f'data-images-ok="{len(PLOT_STEMS)}/{len(PLOT_STEMS)}"' in dom
    assert len(re.findall(r'<tr class="job ', dom)) == 5
    assert len(re.findall(r'<tr class="job failed"', dom)) == 1

    shot = tmp_path / "dashboard.png"
    subprocess.run(
        [str(CHROMIUM), *flags, "--window-size=1400,1800", f"--screenshot={shot}", html.as_uri()],
        capture_output=True,
        timeout=120,
    )
    assert imread(shot).shape[:2] == (1800, 1400)
    if os.environ.get("REPORT_SCREENSHOT"):  # to look at it: REPORT_SCREENSHOT=/tmp/dash.png pytest -k chromium
        shutil.copy(shot, os.environ["REPORT_SCREENSHOT"])


# ---------------------------------------------------------------------------------------------------------
# Hydra callbacks, in real multiruns of a stand-in task that writes results.json the way the run does

APP = """
import json, os, sys
import hydra
from hydra.core.hydra_config import HydraConfig

@hydra.main(version_base="1.3", config_path=".", config_name="cfg")
def main(cfg):
    if cfg.fail:
        raise RuntimeError(f"boom at layers={cfg.compress.layers}")
    hc = HydraConfig.get()
    results = {
        "status": "completed", "error": None, "config": {"compress": {"layers": cfg.compress.layers}},
        "overrides": list(hc.overrides.task), "pid": os.getpid(), "gpu": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }
    with open(os.path.join(hc.runtime.output_dir, "results.json"), "w") as f:
        json.dump(results, f)

main()
"""

APP_CFG = """
fail: false
compress: {{layers: 0}}
hydra:
  searchpath: [file://{conf}]
  sweep: {{dir: {sweep_dir}}}
  callbacks:
    sweep_report:
      _target_: harness.sweep_callback.SweepReport
"""


def _multirun(tmp_path: Path, *overrides: str) -> tuple[subprocess.CompletedProcess, Path]:
    sweep_dir = tmp_path / "sweep"
    # Only the launcher configs of the repo, so the stand-in app's keys cannot clash with the run's groups.
    conf = tmp_path / "conf"
    shutil.copytree(REPO / "conf" / "hydra" / "launcher", conf / "hydra" / "launcher")
    (tmp_path / "app.py").write_text(APP)
    (tmp_path / "cfg.yaml").write_text(textwrap.dedent(APP_CFG.format(conf=conf, sweep_dir=sweep_dir)))
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"} | {"PYTHONPATH": pythonpath()}
    cmd = [sys.executable, "app.py", "-m", *overrides]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    return proc, sweep_dir


@pytest.mark.slow
def test_sweep_report_callback_keeps_report_when_a_job_fails(tmp_path):
    proc, sweep_dir = _multirun(tmp_path, "compress.layers=0,20", "fail=false,true")
    # Hydra re-raises the failed job after the batch and skips on_multirun_end: on_job_end wrote the report.
    assert proc.returncode != 0 and "boom" in proc.stderr
    rows = collect(sweep_dir)
    assert [(r["job"], r["status"]) for r in rows] == [(0, "completed"), (1, "failed"), (2, "completed"), (3, "failed")]
    assert rows[1]["error"] == "RuntimeError: boom at layers=0"
    assert rows[3]["error"] == "RuntimeError: boom at layers=20"
    assert rows[3]["overrides"] == "compress.layers=20 fail=True"  # as Hydra writes the swept value
    md = (sweep_dir / "comparison.md").read_text()
    assert md.count("RuntimeError: boom") == 2
    assert (sweep_dir / "dashboard.html").exists()


@pytest.mark.slow
def test_joblib_gpu_launcher_gives_each_worker_its_own_gpu(tmp_path):
    locks = f"hydra.callbacks.gpu_per_job.lock_dir={tmp_path / 'gpu-locks'}"  # not shared with other runs
    proc, sweep_dir = _multirun(tmp_path, "hydra/launcher=joblib_gpu", locks, "compress.layers=0,10,20,30")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in proc.stdout + proc.stderr
    results = [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/results.json"))]
    assert len(results) == 4
    gpu_of_pid: dict[int, set[str]] = {}
    for r in results:
        gpu_of_pid.setdefault(r["pid"], set()).add(r["gpu"])
    # A worker keeps its GPU for every job it runs; two workers never share one.
    assert all(len(gpus) == 1 for gpus in gpu_of_pid.values())
    assert {p.name for p in (tmp_path / "gpu-locks").iterdir()} <= {"gpu-0.lock", "gpu-1.lock"}
    gpus = [next(iter(g)) for g in gpu_of_pid.values()]
    assert len(set(gpus)) == len(gpus) and set(gpus) <= {"0", "1"}
    # on_multirun_end ran too (no failures) and the report has every job.
    assert len(collect(sweep_dir)) == 4 and (sweep_dir / "dashboard.html").exists()


def test_callback_is_inactive_outside_multirun_and_never_raises(tmp_path, caplog):
    job_dir = tmp_path / "0"
    job_dir.mkdir()
    (job_dir / "results.json").write_text(json.dumps(make_results(0, 0, "none")))
    cfg = OmegaConf.create(
        {"hydra": {"mode": RunMode.RUN, "runtime": {"output_dir": str(job_dir)}, "sweep": {"subdir": "0"}}}
    )
    ret = JobReturn(status=JobStatus.COMPLETED)
    SweepReport().on_job_end(cfg, ret)
    assert not (tmp_path / "dashboard.html").exists()

    cfg.hydra.mode = RunMode.MULTIRUN
    SweepReport().on_job_end(cfg, ret)
    assert (tmp_path / "dashboard.html").exists()

    # A sweep dir that vanished: a warning, not an exception that would end the sweep.
    cfg.hydra.runtime.output_dir = str(tmp_path / "gone" / "0")
    with caplog.at_level(logging.WARNING, logger="harness.sweep_callback"):
        SweepReport().on_job_end(cfg, ret)
        SweepReport().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "gone")}}}))
    assert len([r for r in caplog.records if "sweep report not written" in r.getMessage()]) == 2


# ---------------------------------------------------------------------------------------------------------
# assign_gpu


@pytest.fixture
def fresh_gpu_state(monkeypatch):
    """assign_gpu pins the process; give each test an unpinned process and a clean CUDA_VISIBLE_DEVICES."""
    monkeypatch.setattr(sweep_callback, "_pinned", None)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def test_assign_gpu_off_without_n_gpus(fresh_gpu_state, tmp_path):
    assert assign_gpu(3, None, tmp_path) is None
    assert assign_gpu(3, 0, tmp_path) is None
    assert "CUDA_VISIBLE_DEVICES" not in os.environ


def test_assign_gpu_from_job_number_and_pins_the_process(fresh_gpu_state, tmp_path):
    assert assign_gpu(5, 4, tmp_path) == "1"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1"
    # This process's CUDA context would already sit on GPU 1: a later job here stays there.
    assert assign_gpu(6, 4, tmp_path) == "1"


def test_assign_gpu_maps_through_visible_devices_and_skips_held_gpus(fresh_gpu_state, tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    with open(tmp_path / "gpu-6.lock", "a") as held:  # another worker holds GPU 6, job 1's first choice
        fcntl.flock(held, fcntl.LOCK_EX)
        assert assign_gpu(1, 2, tmp_path) == "4"


def test_assign_gpu_rejects_more_gpus_than_visible(fresh_gpu_state, tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with pytest.raises(ValueError, match="lists only 1"):
        assign_gpu(0, 2, tmp_path)
