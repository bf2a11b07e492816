"""Find the Hydra jobs under a sweep dir and flatten each job's results.json into one report row.

A job dir is any dir holding `results.json` or `.hydra/overrides.yaml` (Hydra writes the latter before the
job runs), so a job that crashed before writing results still shows up, as a failed row.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from harness.errors import HarnessError
from harness.schema import column_value, report_columns

RESULTS_FILE = "results.json"

# The job's identity: where it ran and what it was asked to do (config and overrides, not results.json fields).
JOB_COLUMNS = ["job", "job_dir", "overrides", "status", "error", "model", "codec", "cache", "layers"]


def columns() -> list[str]:
    """Column order of comparison.csv: the job's identity, then every report column of harness.schema.FIELDS."""
    return JOB_COLUMNS + [name for name, _, _ in report_columns()]


COLUMNS = columns()  # every row has exactly these keys


def find_job_dirs(sweep_dir: Path) -> list[Path]:
    """Job dirs at any depth, so a custom hydra.sweep.subdir (e.g. the override dirname) works too."""
    dirs = {p.parent for p in sweep_dir.rglob(RESULTS_FILE)}
    dirs |= {p.parent.parent for p in sweep_dir.rglob("overrides.yaml") if p.parent.name == ".hydra"}
    return sorted(dirs)


def collect(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """One row per job dir under `sweep_dir`, sorted by job number; [] when no job has started yet."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise HarnessError(f"sweep dir {str(sweep_dir)!r} does not exist or is not a directory")
    rows = [job_row(d, sweep_dir) for d in find_job_dirs(sweep_dir)]
    return sorted(rows, key=lambda r: (r["job"] is None, r["job"] or 0, r["job_dir"]))


def job_row(job_dir: Path, sweep_dir: Path) -> dict[str, Any]:
    results, problem = read_results(job_dir)
    # Before results.json exists, the composed job config tells at least which model/codec/cache it was.
    config = results.get("config") or _read_yaml(job_dir / ".hydra" / "config.yaml") or {}
    overrides = results.get("overrides")
    if overrides is None:
        overrides = _read_yaml(job_dir / ".hydra" / "overrides.yaml") or []
    status = results.get("status") or "failed"
    error = results.get("error") or problem
    if status != "completed" and not error:
        error = f"job ended with status {status!r} and no error message"

    rel = job_dir.relative_to(sweep_dir)
    return {
        "job": _job_num(job_dir),
        "job_dir": "." if rel == Path(".") else rel.as_posix(),
        "overrides": " ".join(str(o) for o in overrides),
        "status": status,
        "error": error,
        "model": _name(_get(config, "model")),
        "codec": _name(_get(config, "compress", "codec")),
        "cache": _name(_get(config, "cache")),
        "layers": _get(config, "compress", "layers"),
        # the results.json fields (None where the file has none: a failed job, or one from before the field)
        **{name: column_value(results, f, side) for name, f, side in report_columns()},
    }


def read_results(job_dir: Path) -> tuple[dict[str, Any], str | None]:
    """(results, None), or ({}, why there are none) when the file is missing or unreadable."""
    path = job_dir / RESULTS_FILE
    if not path.exists():
        return {}, f"no {RESULTS_FILE}: the job crashed before writing results (or is still running)"
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return {}, f"{RESULTS_FILE} unreadable: {e}"
    if not isinstance(results, dict):
        return {}, f"{RESULTS_FILE} holds a {type(results).__name__}, not an object"
    return results, None


def _job_num(job_dir: Path) -> int | None:
    num = _get(_read_yaml(job_dir / ".hydra" / "hydra.yaml"), "hydra", "job", "num")
    if isinstance(num, int):
        return num
    # Hydra's default hydra.sweep.subdir is ${hydra.job.num}.
    return int(job_dir.name) if job_dir.name.isdigit() else None


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def _name(node: Any) -> Any:
    """A config group node ({name: ..., ...}) or a plain value such as `codec: zstd`."""
    return node.get("name") if isinstance(node, dict) else node
