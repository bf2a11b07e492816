"""Sweeps end to end: a real 2x2 multirun on the tiny model (results, report, dashboard in Chromium, one W&B
group), how W&B runs of a sweep are named/grouped/tagged, and the W&B report command offline."""

from __future__ import annotations

import csv
import json
import os
import re
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import RunIf, pythonpath
from test_report import CHROMIUM, PLOT_STEMS  # tests/ is on sys.path (rootdir conftest, no __init__.py)

from harness.tracking import FLAT_KEYS, SweepInfo, flat_config, make_tracker, run_identity, sweep_group

REPO = Path(__file__).resolve().parents[1]
LINEARS = 15  # tiny Llama: 2 blocks x 7 + lm_head


# ---------------------------------------------------------------------------------------------------------
# Reading an offline W&B run: the .wandb file is a LevelDB-style log of wandb_internal_pb2.Record messages
# (wandb >= 0.19 no longer ships a Python reader). Header ":W&B", 0xBEE1, version; records in 32 KiB blocks,
# each chunk with a 7-byte header (crc32c, length, type: 1 full, 2 first, 3 middle, 4 last).


def wandb_records(path: Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1), f"{path} is not a W&B transaction log"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer: padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zeroed rest of the block
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            yield record
            buf = b""


def offline_run(job_dir: Path) -> dict:
    """The run record of the job's only offline W&B run: group, job_type, tags, name, config, exit code."""
    runs = list((job_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, f"{job_dir}: expected one offline W&B run, found {runs}"
    (log,) = runs[0].glob("*.wandb")
    out: dict = {}
    for r in wandb_records(log):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run = r.run
            out.update(
                group=run.run_group,
                job_type=run.job_type,
                tags=list(run.tags),
                name=run.display_name,
                config={u.key: json.loads(u.value_json) for u in run.config.update},
            )
        elif kind == "exit":
            out["exit_code"] = r.exit.exit_code
    return out


def headless_dom(html: Path, profile: Path) -> str:
    """The dashboard's DOM after its scripts ran in headless Chromium (flags as in test_report)."""
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=5000",
    ]
    proc = subprocess.run([str(CHROMIUM), *flags, "--dump-dom", html.as_uri()], capture_output=True, text=True, timeout=120)
    assert "</html>" in proc.stdout, proc.stderr[-2000:]
    return proc.stdout


# ---------------------------------------------------------------------------------------------------------
# The real sweep


@pytest.mark.slow
@RunIf(chromium=True)
def test_tiny_2x2_sweep_results_report_dashboard_and_one_wandb_group(harness_cli, tmp_path):
    sweep_dir = tmp_path / "sweep"
    args = [
        "-m",
        "model=tiny",
        "logger=wandb",
        "compress.layers=0,3",
        "cache=none,per_forward_pass",
        "generate.max_new_tokens=3",
        "generate.min_new_tokens=3",
        "generate.repeats=1",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    proc = harness_cli(args, tmp_path, env={"WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stderr[-3000:]

    job_dirs = sorted(p.parent for p in sweep_dir.glob("*/results.json"))
    assert [d.name for d in job_dirs] == ["0", "1", "2", "3"]
    results = {d.name: json.loads((d / "results.json").read_text()) for d in job_dirs}
    assert all(r["status"] == "completed" for r in results.values())
    for r in results.values():  # compress.layers=0 runs end to end: nothing compressed, nothing decompressed
        comp, layers = r["compressed"], r["config"]["compress"]["layers"]
        assert (comp["layers_compressed"], comp["layers_total"]) == (layers, LINEARS)
        assert comp["decompressions"] == (0 if layers == 0 else layers * 3)
        if layers == 0:
            assert comp["compression_ratio"] == 1.0 and comp["decompressions_per_forward_pass"] == 0

    with (sweep_dir / "comparison.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["job_dir"] for r in rows) == ["0", "1", "2", "3"]
    for row in rows:
        res = results[row["job_dir"]]
        base, comp = res["baseline"], res["compressed"]
        assert row["status"] == "completed"
        assert (row["cache"], row["layers"]) == (res["config"]["cache"]["name"], str(res["config"]["compress"]["layers"]))
        assert int(row["baseline_peak_bytes"]) == base["memory"]["peak_bytes"]
        assert int(row["compressed_peak_bytes"]) == comp["memory"]["peak_bytes"]
        assert float(row["peak_memory_ratio"]) == res["comparison"]["peak_memory_ratio"]
        assert int(row["decompressions"]) == comp["decompressions"]
        assert float(row["decompressions_per_forward_pass"]) == comp["decompressions_per_forward_pass"]
        assert int(row["layers_compressed"]) == comp["layers_compressed"]
    for stem in PLOT_STEMS:
        assert (sweep_dir / f"{stem}.png").read_bytes().startswith(b"\x89PNG")

    dom = headless_dom(sweep_dir / "dashboard.html", tmp_path / "chromium-profile")
    assert f'data-images-ok="{len(PLOT_STEMS)}/{len(PLOT_STEMS)}"' in dom
    assert len(re.findall(r'<tr class="job ', dom)) == 4 and '<tr class="job failed"' not in dom

    runs = {d.name: offline_run(d) for d in job_dirs}
    groups = {run["group"] for run in runs.values()}
    assert groups == {sweep_group(sweep_dir)}, groups  # the 4 offline runs share one group
    for num, run in runs.items():
        cfg = results[num]["config"]
        assert run["exit_code"] == 0  # each job finished its own run
        assert run["job_type"] == "sweep"
        assert cfg["logger"]["group"] == run["group"]  # results.json records it too
        layers, cache = cfg["compress"]["layers"], cfg["cache"]["name"]
        assert {f"compress.layers={layers}", f"cache={cache}", "model=tiny"} <= set(run["tags"])
        assert run["name"] == f"{num}: compress.layers={layers} cache={cache}"  # the swept overrides only
        assert {k: run["config"][k] for k in FLAT_KEYS} == {
            "model_name": "tiny",
            "codec": cfg["compress"]["codec"],
            "cache_policy": cache,
            "layers": layers,
        }
        assert run["config"]["compress"]["layers"] == layers  # the nested config as before


# ---------------------------------------------------------------------------------------------------------
# Naming, grouping and tagging


def test_sweep_group_names():
    assert sweep_group("outputs/multirun/2025-01-01/12-00-00") == "sweep-2025-01-01-12-00-00"
    a, b = sweep_group("/x/a/sweep"), sweep_group("/x/b/sweep")
    assert a.startswith("sweep-sweep-") and a != b  # same dir name elsewhere: another group


CONFIG = {
    "model": {"name": "tiny"},
    "compress": {"layers": 20, "codec": "zstd"},
    "cache": {"name": "none"},
    "logger": {"name": "wandb", "group": None, "job_type": None, "tags": ["mine"]},
}


def test_single_run_keeps_the_logger_config():
    ident = run_identity(CONFIG["logger"], ["cache=none"], None, "harness")
    assert ident == {"name": "harness", "group": None, "job_type": None, "tags": ["mine"]}


def test_sweep_job_identity(tmp_path):
    overrides = ["model=tiny", "logger=wandb", "compress.layers=20", "cache=none", "generate.max_new_tokens=3"]
    sweep = SweepInfo(tmp_path / "2025-01-01" / "12-00-00", job_num=2, swept_keys=["compress.layers", "cache"])
    ident = run_identity(CONFIG["logger"], overrides, sweep, "harness")
    assert ident["group"] == "sweep-2025-01-01-12-00-00" and ident["job_type"] == "sweep"
    assert ident["name"] == "2: compress.layers=20 cache=none"
    assert ident["tags"] == ["mine", "model=tiny", "compress.layers=20", "cache=none", "generate.max_new_tokens=3"]
    # Set in the config: wins. Swept keys unknown: every override names the run.
    logger = {**CONFIG["logger"], "group": "g", "job_type": "ablation"}
    ident = run_identity(logger, ["cache=none", "x=" + "y" * 200], SweepInfo(tmp_path), "harness")
    assert (ident["group"], ident["job_type"]) == ("g", "ablation")
    assert ident["name"].startswith("cache=none x=yyy") and len(ident["name"]) == 128
    assert all(len(t) <= 64 for t in ident["tags"])


def test_flat_config_keys():
    assert flat_config(CONFIG) == {"model_name": "tiny", "codec": "zstd", "cache_policy": "none", "layers": 20}
    assert set(FLAT_KEYS).isdisjoint(CONFIG)  # W&B reads a dot as nesting: flat keys must not shadow a section


def test_swept_keys_from_multirun_yaml(tmp_path):
    from harness.tracking import _swept_keys

    (tmp_path / "multirun.yaml").write_text(
        "hydra:\n  overrides:\n    task:\n    - model=tiny\n    - compress.layers=0,3\n    - cache=none,per_forward_pass\n"
    )
    assert _swept_keys(tmp_path) == ["compress.layers", "cache"]
    assert _swept_keys(tmp_path / "nope") == []


def test_logger_none_touches_no_wandb(tmp_path):
    logger = {"name": "none"}
    tracker = make_tracker(logger, {"logger": logger}, tmp_path, "harness", ["cache=none"], sweep=SweepInfo(tmp_path))
    assert tracker.lightning_logger is False and logger == {"name": "none"}


# ---------------------------------------------------------------------------------------------------------
# python -m harness.report.wandb_workspace


def _workspace_cli(*args: str, env: dict | None = None, home: Path | None = None) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")} | {"PYTHONPATH": pythonpath()}
    if home is not None:  # no ~/.netrc, no W&B settings: no API key
        full |= {"HOME": str(home), "WANDB_CONFIG_DIR": str(home / ".config" / "wandb")}
    full |= env or {}
    cmd = [sys.executable, "-m", "harness.report.wandb_workspace", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=full, timeout=120)


@pytest.mark.parametrize(
    "env,why",
    [
        ({"WANDB_MODE": "offline"}, "WANDB_MODE=offline"),
        ({"WANDB_API_KEY": "a" * 40, "WANDB_BASE_URL": "http://127.0.0.1:9"}, "127.0.0.1:9 unreachable"),
        ({"WANDB_BASE_URL": "http://127.0.0.1:{port}"}, "no W&B API key"),
    ],
    ids=["wandb-mode-offline", "server-unreachable", "no-api-key"],
)
@RunIf(packages=["wandb_workspaces"])
def test_workspace_command_offline_says_it_needs_the_network(tmp_path, env, why):
    with socket.create_server(("127.0.0.1", 0)) as server:  # a "server" that is up but never answers
        env = {k: v.format(port=server.getsockname()[1]) for k, v in env.items()}
        proc = _workspace_cli("--group", "sweep-2025-01-01-12-00-00", env=env, home=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stdout == "" and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: a W&B report needs the network") and why in proc.stderr


@RunIf(packages=["wandb_workspaces"])
def test_workspace_command_prints_the_report_spec_offline(tmp_path):
    job = tmp_path / "sweep" / "0"
    job.mkdir(parents=True)
    logger = {"name": "wandb", "group": "sweep-x-123456", "project": "proj", "entity": None}
    (job / "results.json").write_text(json.dumps({"status": "completed", "config": {"logger": logger}}))
    proc = _workspace_cli(str(tmp_path / "sweep"), "--print", env={"WANDB_MODE": "offline"}, home=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    spec = json.loads(proc.stdout)
    assert spec["displayName"] == "Sweep sweep-x-123456" and spec["project"]["name"] == "proj"
    grids = [b["metadata"] for b in spec["spec"]["blocks"] if b["type"] == "panel-grid"]
    runsets = [rs for g in grids for rs in g["runSets"]]
    assert all(rs["filters"]["filters"][0]["value"] == "sweep-x-123456" for rs in runsets)
    assert [rs["grouping"] for rs in runsets] == [[], [{"section": "config", "name": "cache_policy.value"}]]
    panels = [p for g in grids for p in g["panelBankSectionConfig"]["panels"]]
    kinds = [p["viewType"] for p in panels]
    assert "Parallel Coordinates Plot" in kinds and "Run Comparer" in kinds
    (pc,) = [p for p in panels if p["viewType"] == "Parallel Coordinates Plot"]
    accessors = [c["accessor"] for c in pc["config"]["columns"]]
    assert [f"config:{k}.value" for k in FLAT_KEYS] == accessors[:4]
    assert "summary:compressed/memory/peak_bytes" in accessors and "summary:comparison/slowdown" in accessors
    assert any(p["config"].get("groupBy") == "cache_policy.value" for p in panels)

    ws = _workspace_cli("--group", "g", "--kind", "workspace", "--print", home=tmp_path)
    assert ws.returncode == 0 and '"g"' in ws.stdout, ws.stderr[-2000:]


def test_workspace_command_sweep_dir_without_wandb_runs_exits_2(tmp_path):
    job = tmp_path / "0"
    job.mkdir()
    (job / "results.json").write_text(json.dumps({"status": "completed", "config": {"logger": {"name": "none"}}}))
    proc = _workspace_cli(str(tmp_path), home=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("error: no job under") and "logger=wandb" in proc.stderr
