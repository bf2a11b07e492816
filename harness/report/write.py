"""write_report: comparison.csv, comparison.md, the plot PNGs and dashboard.html, into the sweep dir."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from harness.atomic import write_atomic
from harness.report.collect import collect
from harness.report.dashboard import render_dashboard
from harness.report.plots import render_plots
from harness.report.tables import to_csv, to_markdown

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; parallel jobs may then race on the report files.
    fcntl = None

LOCK_FILE = ".report.lock"


def write_report(sweep_dir: str | Path, rows: list[dict[str, Any]] | None = None) -> dict[str, Path]:
    """Write every report file into `sweep_dir`; returns {"csv"|"md"|"html"|<plot stem>: path}.

    Parallel jobs (joblib workers) each rebuild the report when they end: the lock makes the last one to
    finish also the last to write, and every file is replaced atomically, so readers never see half a file.
    """
    sweep_dir = Path(sweep_dir)
    with _locked(sweep_dir):
        if rows is None:
            rows = collect(sweep_dir)
        pngs = render_plots(rows)
        paths = {
            "csv": _write(sweep_dir / "comparison.csv", to_csv(rows).encode()),
            "md": _write(sweep_dir / "comparison.md", to_markdown(rows).encode()),
        }
        for stem, png in pngs.items():
            paths[stem] = _write(sweep_dir / f"{stem}.png", png)
        paths["html"] = _write(sweep_dir / "dashboard.html", render_dashboard(sweep_dir, rows, pngs).encode())
    return paths


_write = write_atomic


@contextlib.contextmanager
def _locked(sweep_dir: Path) -> Iterator[None]:
    if fcntl is None:
        yield
        return
    with open(sweep_dir / LOCK_FILE, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
        except OSError:
            pass  # a shared file system without flock (some NFS mounts): write unlocked, still atomically
        yield
