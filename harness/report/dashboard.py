"""dashboard.html: one self-contained file (inline CSS, plots as base64 data URIs) to open or attach anywhere."""

from __future__ import annotations

import base64
from datetime import datetime
from html import escape
from pathlib import Path
from typing import Any

from harness.report.tables import cell, common_overrides, display_columns, varying_overrides

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0; color: #1d2433;
       background: #f5f6f8; }
header { background: #1d2433; color: #fff; padding: 16px 28px; }
header h1 { margin: 0 0 4px; font-size: 20px; font-weight: 600; }
header .meta { color: #c5cad6; font-size: 13px; }
header code { color: #fff; }
main { padding: 18px 28px 40px; }
.badges span { display: inline-block; margin: 0 8px 12px 0; padding: 3px 10px; border-radius: 12px;
               font-weight: 600; font-size: 13px; background: #e3e7ee; }
.badges .ok { background: #d7f0dd; color: #17692e; }
.badges .bad { background: #fadada; color: #9b1c1c; }
h2 { font-size: 16px; margin: 22px 0 10px; }
.plots { display: grid; grid-template-columns: repeat(auto-fit, minmax(560px, 1fr)); gap: 14px; }
.plots figure { margin: 0; background: #fff; border: 1px solid #dde1e8; border-radius: 6px; padding: 8px; }
.plots figure.wide { grid-column: 1 / -1; }
.plots img { width: 100%; height: auto; display: block; }
.tablewrap { overflow-x: auto; background: #fff; border: 1px solid #dde1e8; border-radius: 6px; }
table { border-collapse: collapse; font-size: 13px; width: 100%; }
th, td { padding: 5px 8px; border-bottom: 1px solid #e8ebf0; text-align: right; white-space: nowrap; }
th { background: #eef1f5; position: sticky; top: 0; font-weight: 600; white-space: normal; vertical-align: bottom;
     min-width: 48px; }
td.text, th.text { text-align: left; }
td.overrides { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12px; white-space: normal;
               min-width: 160px; max-width: 240px; }
tr.job:nth-child(even) { background: #fafbfc; }
tr.failed, tr.failed:nth-child(even) { background: #fde8e8; }
tr.running, tr.running:nth-child(even) { background: #fff6d6; }
tr.failed td.status { color: #9b1c1c; font-weight: 600; }
.err { white-space: normal; color: #9b1c1c; font-size: 12px; min-width: 180px; max-width: 320px; font-weight: 400; }
td.no { color: #9b1c1c; font-weight: 700; }
.common { font-size: 13px; color: #4a5263; margin: 8px 0 0; }
#img-warning { display: none; color: #9b1c1c; font-weight: 600; }
"""

# Lets a reader (and the headless-browser test) see that every embedded plot decoded: body[data-images-ok].
SCRIPT = """
window.addEventListener("load", () => {
  const imgs = [...document.images];
  const ok = imgs.filter((i) => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.imagesOk = ok + "/" + imgs.length;
  if (ok < imgs.length) document.getElementById("img-warning").style.display = "block";
});
"""

TEXT_COLUMNS = {"overrides", "status", "model", "codec", "cache", "fidelity"}
CONSTANT_CANDIDATES = ("model", "codec")
WIDE_PLOTS = {"memory_vs_layers", "throughput_vs_layers"}  # two panels each: they get a full row


def render_dashboard(sweep_dir: Path, rows: list[dict[str, Any]], pngs: dict[str, bytes]) -> str:
    n_failed = sum(r["status"] == "failed" for r in rows)
    n_done = sum(r["status"] == "completed" for r in rows)
    n_other = len(rows) - n_failed - n_done
    badges = [f"<span>{len(rows)} jobs</span>", f'<span class="ok">{n_done} completed</span>']
    if n_failed:
        badges.append(f'<span class="bad">{n_failed} failed</span>')
    if n_other:
        badges.append(f"<span>{n_other} running / other</span>")

    figures = []
    for stem, png in pngs.items():
        data = base64.b64encode(png).decode("ascii")
        wide = ' class="wide"' if stem in WIDE_PLOTS else ""
        figures.append(f'<figure{wide}><img alt="{escape(stem)}" src="data:image/png;base64,{data}"></figure>')

    common = common_overrides(rows)
    # A column with one value for every job says nothing per row: state it once under the table instead.
    constant = {k: vals.pop() for k in CONSTANT_CANDIDATES if len(vals := {r[k] for r in rows} - {None}) == 1}
    columns = [(h, get) for h, get in display_columns() if h not in constant]
    shared = [f"{k} <code>{escape(str(v))}</code>" for k, v in constant.items()]
    if common:
        shared.append(f"overrides <code>{escape(' '.join(common))}</code>")
    common_line = f'<p class="common">Same for every job: {" · ".join(shared)}</p>' if shared else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Sweep report · {escape(sweep_dir.name)}</title>
<style>{CSS}</style>
<script>{SCRIPT}</script>
</head><body>
<header><h1>Compressed vs baseline inference: sweep report</h1>
<div class="meta">sweep dir <code>{escape(str(sweep_dir.resolve()))}</code> · started {_started(sweep_dir)}
 · report written {datetime.now():%Y-%m-%d %H:%M:%S}</div></header>
<main>
<div class="badges">{"".join(badges)}</div>
<p id="img-warning">Some plots failed to load.</p>
<h2>Jobs</h2>
<div class="tablewrap"><table>
<thead><tr>{"".join(_th(h) for h, _ in columns)}</tr></thead>
<tbody>
{"".join(_tr(r, common, columns) for r in rows)}
</tbody></table></div>
{common_line}
<h2>Plots</h2>
<div class="plots">{"".join(figures)}</div>
</main></body></html>
"""


def _th(header: str) -> str:
    cls = ' class="text"' if header in TEXT_COLUMNS else ""
    return f"<th{cls}>{escape(header)}</th>"


def _tr(row: dict[str, Any], common: list[str], columns: list[tuple[str, Any]]) -> str:
    cells = []
    for header, get in columns:
        value = varying_overrides(row, common) if header == "overrides" else get(row)
        classes = ["text"] if header in TEXT_COLUMNS else []
        if header in ("overrides", "status"):
            classes.append(header)
        if header == "outputs match" and value == "NO":
            classes.append("no")
        body = escape(cell(value))
        if header == "status" and row["error"]:
            body += f'<div class="err">{escape(str(row["error"]))}</div>'
        cls = f' class="{" ".join(classes)}"' if classes else ""
        cells.append(f"<td{cls}>{body}</td>")
    status = escape(str(row["status"]))
    return f'<tr class="job {status}" data-job="{escape(cell(row["job"]))}">{"".join(cells)}</tr>\n'


def _started(sweep_dir: Path) -> str:
    """Hydra writes multirun.yaml when the sweep starts; fall back to the dir's own mtime."""
    marker = sweep_dir / "multirun.yaml"
    stamp = (marker if marker.exists() else sweep_dir).stat().st_mtime
    return f"{datetime.fromtimestamp(stamp):%Y-%m-%d %H:%M:%S}"
