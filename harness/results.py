"""results.json (written as soon as each phase exists, atomically) and the printed summary."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from harness.atomic import write_atomic
from harness.schema import FIELDS, SCHEMA_VERSION, SIDES, Field, memory_kind, written


def _clean(obj: Any) -> Any:
    """JSON-safe: inf/nan become null, tuples lists, keys strings."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


class ResultsFile:
    """The job's results.json. Every update rewrites it whole (temp file + rename), so a crash or an
    out-of-memory error later in the run never loses the phases already measured."""

    def __init__(self, path: Path, config: dict[str, Any], overrides: list[str]) -> None:
        self.path = Path(path)
        self.data: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "status": "running", "error": None,
                                     "config": config, "overrides": overrides}
        self.write()

    def update(self, **sections: Any) -> None:
        self.data.update(sections)
        self.write()

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, json.dumps(_clean(self.data), indent=2))


def summary_rows(results: dict[str, Any]) -> tuple[list[tuple[str, str, str]], list[tuple[str, str]]]:
    """(baseline | compressed rows, single-value lines), in harness.schema.FIELDS order."""
    base = results.get("baseline")
    context = {
        "repeats": base["repeats"] if base else 0,
        "rounds": (results.get("rounds") or {}).get("rounds"),
        "memory_kind": memory_kind(results),
    }
    rows: list[tuple[str, str, str]] = []
    lines: list[tuple[str, str]] = []
    for f in FIELDS:
        if f.label is None or (f.when is not None and not f.when(results)):
            continue
        if f.fmt is not None:
            cells = [_cell(f, results, side) for side in SIDES]
            rows.append((f.label.format(**context), *cells))
        elif f.line is not None and written(results, f.path):  # a results.json from before the field: no line
            text = f.line(results)
            if text is not None:
                lines.append((f.label, text))
    return rows, lines


def _cell(f: Field, results: dict[str, Any], side: str) -> str:
    if results.get(side) is None:
        return "-"
    v = f.value(results, side)
    return "-" if v is None else f.fmt(v)


def summary_table(results: dict[str, Any]) -> str:
    """The prototype's RESULTS SUMMARY, side by side, every figure with its unit (rows and lines: harness.schema)."""
    cfg = results["config"]
    rows, figures = summary_rows(results)
    c = cfg.get("compress", {})
    codec = str(c.get("codec"))
    settings = f"level {c.get('level')}" if codec.startswith("zstd") else f"placement {c.get('placement', 'cpu')}"
    title = (
        f"model {cfg.get('model', {}).get('name')} | codec {codec} ({settings}) | "
        f"cache {cfg.get('cache', {}).get('name')} | device {results.get('device', cfg.get('device'))}"
    )
    w = max(len(r[0]) for r in rows) + 2
    lines = ["=" * 72, "RESULTS SUMMARY".center(72), title, "=" * 72, f"{'':<{w}}{'baseline':>18}{'compressed':>22}"]
    lines += [f"{label:<{w}}{b:>18}{cv:>22}" for label, b, cv in rows]
    lines.append("-" * 72)
    lines += [f"{label:<{w}}{text}" for label, text in figures]
    if results.get("status") == "failed":
        lines.append(f"FAILED: {results.get('error')}")
    lines.append("=" * 72)
    return "\n".join(lines)
