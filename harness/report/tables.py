"""Rows as comparison.csv (raw numbers, bytes) and as a human-readable table (markdown, dashboard)."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from typing import Any

from harness.report.collect import columns
from harness.schema import SIDE_ABBR, Field, report_columns


def to_csv(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    names = columns()
    writer = csv.DictWriter(out, fieldnames=names, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if r.get(k) is None else r[k] for k in names} for r in rows)
    return out.getvalue()


def _layers(r: dict[str, Any]) -> Any:
    """Requested count, and what it resolved to once the job got that far: "20/211", "all → 211/211"."""
    asked, done, total = r["layers"], r["layers_compressed"], r["layers_total"]
    if done is None:
        return asked
    got = f"{done}/{total}" if total is not None else str(done)
    return got if asked in (None, done) else f"{asked} → {got}"


# The job's identity columns; the results columns come from harness.schema (a field's `header`).
JOB_DISPLAY: list[tuple[str, Callable[[dict[str, Any]], Any]]] = [
    ("job", lambda r: r["job"]),
    ("overrides", lambda r: r["overrides"]),
    ("status", lambda r: r["status"]),
    ("model", lambda r: r["model"]),
    ("codec", lambda r: r["codec"]),
    ("cache", lambda r: r["cache"]),
    ("layers", _layers),
]


def display_columns() -> list[tuple[str, Callable[[dict[str, Any]], Any]]]:
    """(header, how to get the cell text from a report row) of the markdown table and the dashboard; None cells
    print as a dash."""
    return JOB_DISPLAY + [_display(name, f, side) for name, f, side in report_columns() if f.header]


def _display(name: str, f: Field, side: str | None) -> tuple[str, Callable[[dict[str, Any]], Any]]:
    header = f.header.format(s=SIDE_ABBR.get(side, ""))
    if f.row_cell is not None:
        return header, f.row_cell
    fmt = f.cell or (lambda v: v)
    return header, lambda r: _opt(fmt, r[name])


def _opt(fmt: Callable[[Any], str], v: Any) -> str | None:
    return None if v is None else fmt(v)


def cell(value: Any) -> str:
    return "—" if value is None or value == "" else str(value)


def common_overrides(rows: list[dict[str, Any]]) -> list[str]:
    """Overrides every job shares; tables show only the rest, which is what the sweep varied."""
    if len(rows) < 2:
        return []
    sets = [r["overrides"].split() for r in rows if r["overrides"]]
    if len(sets) < len(rows):
        return []
    return [o for o in sets[0] if all(o in s for s in sets[1:])]


def varying_overrides(row: dict[str, Any], common: list[str]) -> str:
    return " ".join(o for o in row["overrides"].split() if o not in common)


def to_markdown(rows: list[dict[str, Any]]) -> str:
    common = common_overrides(rows)
    display = display_columns()
    headers = [h for h, _ in display] + ["error"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        cells = [cell(varying_overrides(r, common) if h == "overrides" else get(r)) for h, get in display]
        cells.append(r["error"] or "")
        lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    if common:
        lines += ["", "Overrides of every job: `" + " ".join(common) + "`"]
    return "\n".join(lines) + "\n"
