"""Sweeps on real engines, on this machine: submitit's local executor (the machinery of hydra/launcher=slurm,
without Slurm) and Ray, on a cluster the test starts and stops. One sweep per engine: the tiny 2x2 gives 4
results.json, a report that agrees with them, plots, the dashboard, 4 W&B runs in one group, and one sound
artifact shared by the two jobs that compress the same layers; of two more jobs, one raises and the other's
process is killed (as the OOM killer or a time limit does): both are red rows with their reason, and the
others run to the end regardless.
"""

from __future__ import annotations

import csv
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from conftest import RunIf, pythonpath
from test_report import PLOT_STEMS
from test_sweep import offline_run

from harness.artifacts import ArtifactKey, _read
from harness.tracking import sweep_group

pytestmark = pytest.mark.slow

TINY = ["model=tiny", "generate.max_new_tokens=3", "generate.min_new_tokens=3", "generate.repeats=1", "generate.rounds=1"]
SWEEP_TIMEOUT_S = 300
RAY_START_TIMEOUT_S = 90
RAY_STOP_TIMEOUT_S = 45


def start_sweep(launcher: str, tmp_path: Path, *args: str, env: dict | None = None) -> tuple[subprocess.Popen, Path]:
    """`python -m harness -m hydra/launcher=LAUNCHER ...` in the background; its output goes to tmp_path/sweep.log."""
    sweep_dir = tmp_path / "sweep"
    full_env = {**os.environ, "PYTHONPATH": pythonpath(), "WANDB_MODE": "offline", **(env or {})}
    cmd = [sys.executable, "-m", "harness", "-m", f"hydra/launcher={launcher}", *TINY, *args,
           f"hydra.sweep.dir={sweep_dir}", f"compress.artifact_dir={tmp_path / 'artifacts'}"]
    out = (tmp_path / "sweep.log").open("w")
    return subprocess.Popen(cmd, cwd=tmp_path, env=full_env, stdout=out, stderr=subprocess.STDOUT), sweep_dir


def finish(proc: subprocess.Popen, tmp_path: Path) -> str:
    try:
        proc.wait(timeout=SWEEP_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    return (tmp_path / "sweep.log").read_text(errors="replace")


def kill_job(job_dir: Path, roots: list[psutil.Process], timeout_s: float = 120) -> int:
    """SIGKILL the process running the job of `job_dir` as soon as it has started (it holds the job's harness.log
    open), looking only among the descendants of `roots`, the processes this test started."""
    log, end = str(job_dir / "harness.log"), time.monotonic() + timeout_s
    while time.monotonic() < end:
        for p in (c for r in roots for c in r.children(recursive=True)):
            try:
                if any(f.path == log for f in p.open_files()):
                    p.send_signal(signal.SIGKILL)
                    return p.pid
            except psutil.Error:  # ended meanwhile, or not ours to look into
                continue
        time.sleep(0.2)
    raise AssertionError(f"no process opened {log} within {timeout_s} s")


# ---------------------------------------------------------------------------------------------------------
# What every engine must produce, from one sweep: the 2x2 (layers 0, 2 x cache none, per_forward_pass) completes;
# the two layers=16 jobs fail (16 > the tiny model's 15 linear layers): job 4 is killed as soon as it starts,
# job 5 raises once the model has loaded.

SWEEP = ["logger=wandb", "compress.layers=0,2,16", "cache=none,per_forward_pass"]
KILLED, RAISED = "4", "5"


def assert_sweep(sweep_dir: Path, artifacts: Path, output: str, returncode: int, died: str) -> None:
    assert returncode == 1, output[-3000:]  # Hydra's exit code for a sweep with failed jobs
    results = {p.parent.name: json.loads(p.read_text()) for p in sweep_dir.glob("*/results.json")}
    assert {n: r["status"] for n, r in results.items()} == {
        "0": "completed", "1": "completed", "2": "completed", "3": "completed", KILLED: "failed", RAISED: "failed"}
    done = {n: r for n, r in results.items() if r["status"] == "completed"}
    assert sorted((r["config"]["compress"]["layers"], r["config"]["cache"]["name"]) for r in done.values()) == [
        (0, "none"), (0, "per_forward_pass"), (2, "none"), (2, "per_forward_pass")]
    assert results[KILLED]["error"].startswith(f"JobDied: {died}"), results[KILLED]["error"]
    assert results[RAISED]["error"].startswith("compress.layers=16 but only 15"), results[RAISED]["error"]

    # The report was rebuilt from the job dirs and agrees with each results.json, failed jobs included.
    with (sweep_dir / "comparison.csv").open() as f:
        rows = {r["job_dir"]: r for r in csv.DictReader(f)}
    assert {n: (r["status"], r["error"]) for n, r in rows.items()} == {
        n: (r["status"], r["error"] or "") for n, r in results.items()}
    for num, res in done.items():
        row, comp = rows[num], res["compressed"]
        assert (row["cache"], row["layers"]) == (res["config"]["cache"]["name"], str(res["config"]["compress"]["layers"]))
        assert int(row["layers_compressed"]) == comp["layers_compressed"]
        assert int(row["decompressions"]) == comp["decompressions"] == 3 * comp["layers_compressed"]
        assert float(row["compressed_tok_s"]) == comp["tokens_per_s"]
        assert float(row["speed_ratio"]) == res["comparison"]["speed_ratio"]
        assert int(row["compressed_peak_bytes"]) == comp["memory"]["peak_bytes"]
    for stem in PLOT_STEMS:
        assert (sweep_dir / f"{stem}.png").read_bytes().startswith(b"\x89PNG")
    html = (sweep_dir / "dashboard.html").read_text()
    assert html.count('<tr class="job completed"') == 4 and html.count('<tr class="job failed"') == 2

    # One W&B run per completed job, each finished by its job, all in the sweep's group.
    runs = {num: offline_run(sweep_dir / num) for num in done}
    assert {run["group"] for run in runs.values()} == {sweep_group(sweep_dir)}
    assert {run["exit_code"] for run in runs.values()} == {0}
    assert {r["config"]["logger"]["group"] for r in done.values()} == {sweep_group(sweep_dir)}

    # The two layers=2 jobs share an artifact key: one whole file, no temporary left, every payload intact.
    paths = {r["compressed"]["artifact_path"] for r in done.values() if r["compressed"]["layers_compressed"]}
    assert len(paths) == 1 and sorted(artifacts.iterdir()) == [Path(p) for p in paths]
    assert_sound_artifact(Path(paths.pop()))


def assert_sound_artifact(path: Path) -> None:
    """Read the artifact the way a cache hit does (harness.artifacts._read: metadata hash, layer set, every
    payload's xxh3), under the key recorded in it."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        info = json.loads(f.metadata()["codecllm"].partition(" ")[2])
    layers = {name: {k: e["header"][k] for k in ("shape", "dtype", "checksum")} for name, e in info["layers"].items()}
    assert len(_read(path, ArtifactKey(info["key"], layers))) == 2


# ---------------------------------------------------------------------------------------------------------
# submitit (hydra/launcher=submitit_local)


@RunIf(packages=["hydra_plugins.hydra_submitit_launcher"])
def test_submitit_local_sweep(tmp_path):
    proc, sweep_dir = start_sweep("submitit_local", tmp_path, *SWEEP)
    kill_job(sweep_dir / KILLED, [psutil.Process(proc.pid)])  # the job runs in a child of submitit's controller
    output = finish(proc, tmp_path)
    assert_sweep(sweep_dir, tmp_path / "artifacts", output, proc.returncode, "UncompletedJobError: Job ")
    assert "has not produced any output" in json.loads((sweep_dir / KILLED / "results.json").read_text())["error"]
    assert len(list((sweep_dir / ".submitit").glob("*/*_result.pkl"))) == 5  # every job but the killed one


# ---------------------------------------------------------------------------------------------------------
# Ray (hydra/launcher=ray), joining a cluster this test starts and stops


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A one-node Ray cluster (`ray start --head --block`, in its own process group): yields (its process, the
    environment a driver joins it with). Jobs run in its workers, so they get its environment: the repo on
    PYTHONPATH, W&B offline. Ray's token authentication stays on: `ray start` with RAY_AUTH_MODE=token refuses to
    start without a token (it makes none itself), so the cluster and its driver get a fresh one in RAY_AUTH_TOKEN,
    never written to ~/.ray; a driver given an explicit address sends it only with RAY_AUTH_MODE=token.
    Stopped with SIGTERM (--block then stops what it started), SIGKILL to the group if that takes too long."""
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    port = _free_port()
    log = tmp_path_factory.mktemp("ray") / "ray.log"
    # Its own temp dir: its sessions, logs and sockets, and the record of "the cluster last started here", which
    # `ray stop` would delete and --block leaves behind, go with it instead of into the shared /tmp/ray. (Short,
    # under /tmp: Ray's socket paths must stay within 107 bytes.)
    temp_dir = tempfile.mkdtemp(prefix="codecllm-ray-", dir="/tmp")
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", f"--port={port}",
           f"--temp-dir={temp_dir}",
           "--node-ip-address=127.0.0.1", "--include-dashboard=false", "--disable-usage-stats",
           f"--ray-client-server-port={_free_port()}", f"--dashboard-agent-listen-port={_free_port()}",
           f"--metrics-export-port={_free_port()}"]
    env = {**os.environ, "PYTHONPATH": pythonpath(), "WANDB_MODE": "offline", **auth}
    with log.open("w") as out:
        head = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        end = time.monotonic() + RAY_START_TIMEOUT_S
        while "Ray runtime started" not in log.read_text(errors="replace"):
            assert head.poll() is None and time.monotonic() < end, log.read_text(errors="replace")[-3000:]
            time.sleep(0.2)
        yield head, {"RAY_ADDRESS": f"127.0.0.1:{port}", **auth}
    finally:
        processes = [head, *psutil.Process(head.pid).children(recursive=True)] if head.poll() is None else []
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=RAY_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=10)
        left = [p.pid for p in processes[1:] if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"the Ray cluster left processes behind: {left}"


@RunIf(packages=["hydra_plugins.hydra_ray_launcher"])  # before ray_cluster starts a cluster for nothing
def test_ray_sweep(ray_cluster, tmp_path):
    head, join = ray_cluster
    proc, sweep_dir = start_sweep("ray", tmp_path, *SWEEP, env=join)
    kill_job(sweep_dir / KILLED, [psutil.Process(head.pid)], timeout_s=240)  # in a worker of the cluster, after 0-3
    output = finish(proc, tmp_path)
    assert "Connecting to existing Ray cluster at address: " in output and "(_run_job pid=" in output
    assert_sweep(sweep_dir, tmp_path / "artifacts", output, proc.returncode, "WorkerCrashedError: The worker died")
