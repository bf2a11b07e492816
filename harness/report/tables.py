"""Rows as comparison.csv (raw numbers, bytes) and as a human-readable table (markdown, dashboard)."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from typing import Any

from harness.report.collect import COLUMNS

MIB = 2**20


def to_csv(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if r.get(k) is None else r[k] for k in COLUMNS} for r in rows)
    return out.getvalue()


def _num(fmt: str) -> Callable[[Any], str]:
    return lambda v: format(v, fmt) if isinstance(v, int | float) and not isinstance(v, bool) else str(v)


def _mib(v: Any) -> str:
    return f"{v / MIB:,.1f}" if isinstance(v, int | float) else str(v)


def _layers(r: dict[str, Any]) -> Any:
    """Requested count, and what it resolved to once the job got that far: "20/211", "all → 211/211"."""
    asked, done, total = r["layers"], r["layers_compressed"], r["layers_total"]
    if done is None:
        return asked
    got = f"{done}/{total}" if total is not None else str(done)
    return got if asked in (None, done) else f"{asked} → {got}"


# (header, how to get the cell text from a row); None cells print as a dash.
DISPLAY: list[tuple[str, Callable[[dict[str, Any]], Any]]] = [
    ("job", lambda r: r["job"]),
    ("overrides", lambda r: r["overrides"]),
    ("status", lambda r: r["status"]),
    ("model", lambda r: r["model"]),
    ("codec", lambda r: r["codec"]),
    ("cache", lambda r: r["cache"]),
    ("layers", _layers),
    ("base tok/s", lambda r: _opt(_num(".1f"), r["baseline_tok_s"])),
    ("comp tok/s", lambda r: _opt(_num(".1f"), r["compressed_tok_s"])),
    ("speed ratio [IQR]", lambda r: _speed(r)),
    ("slowdown", lambda r: _opt(_num(".2f"), r["slowdown"])),
    ("base peak MiB", lambda r: _opt(_mib, r["baseline_peak_bytes"])),
    ("comp peak MiB", lambda r: _opt(_mib, r["compressed_peak_bytes"])),
    ("mem ratio", lambda r: _opt(_num(".3f"), r["peak_memory_ratio"])),
    ("compr. ratio", lambda r: _opt(_num(".3f"), r["compression_ratio"])),
    ("fwd passes", lambda r: r["forward_passes"]),
    ("decomps", lambda r: r["decompressions"]),
    ("decomps / pass", lambda r: _opt(_num(".3g"), r["decompressions_per_forward_pass"])),
    ("outputs match", lambda r: _yes_no(r["outputs_match"])),
    ("token agreement", lambda r: _opt(_num(".1%"), r["token_agreement"])),
    ("lossless", lambda r: _yes_no(r["weights_lossless"])),
    ("exact vs reference", lambda r: _yes_no(r["exactness_reference"])),
    ("fidelity", lambda r: r["fidelity"]),
]


def _speed(r: dict[str, Any]) -> str | None:
    """Baseline / compressed time, the paired rounds' median with its quartiles: "0.82 [0.81-0.89]"."""
    ratio, q1, q3 = r.get("speed_ratio"), r.get("speed_ratio_q1"), r.get("speed_ratio_q3")
    if not isinstance(ratio, int | float):
        return None
    return f"{ratio:.2f} [{q1:.2f}-{q3:.2f}]" if isinstance(q1, int | float) and isinstance(q3, int | float) else f"{ratio:.2f}"


def _yes_no(v: bool | None) -> str | None:
    return None if v is None else "yes" if v else "NO"


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
    headers = [h for h, _ in DISPLAY] + ["error"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        cells = [cell(varying_overrides(r, common) if h == "overrides" else get(r)) for h, get in DISPLAY]
        cells.append(r["error"] or "")
        lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    if common:
        lines += ["", "Overrides of every job: `" + " ".join(common) + "`"]
    return "\n".join(lines) + "\n"
