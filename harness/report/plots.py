"""Sweep plots as PNG bytes: one line per cache policy over the number of compressed layers.

Uses matplotlib's Figure directly (no pyplot), so no GUI backend is picked and no global figure state leaks
between the parallel jobs that each rebuild the report.
"""

from __future__ import annotations

import io
import statistics
from collections.abc import Callable
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure

MIB = 2**20
MARKERS = "os^Dv<>"
Row = dict[str, Any]


def layers_x(row: Row) -> int | None:
    """x position: layers actually compressed, else the requested count; None for "all" without results."""
    if isinstance(row["layers_compressed"], int):
        return row["layers_compressed"]
    layers = row["layers"]
    if isinstance(layers, int) and not isinstance(layers, bool):
        return layers
    if isinstance(layers, str) and layers.isdigit():
        return int(layers)
    return None


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _series_label(rows: list[Row]) -> Callable[[Row], str]:
    """Cache policy, plus model / codec where the sweep varies them (else every line would say the same)."""
    varied = [k for k in ("model", "codec") if len({r[k] for r in rows}) > 1]
    return lambda r: " · ".join(str(r[k]) for k in [*varied, "cache"])


def _plot_series(
    ax: Axes, rows: list[Row], y: Callable[[Row], float | None], band: Callable[[Row], tuple[float, float] | None] | None = None
) -> int:
    """One line per series, with error bars from `band` (e.g. the paired rounds' IQR) where a row has one;
    returns how many points were drawn."""
    label_of = _series_label(rows)
    series: dict[str, list[tuple[int, float, tuple[float, float] | None]]] = {}
    for r in rows:
        x, v = layers_x(r), y(r)
        if x is not None and v is not None:
            series.setdefault(label_of(r), []).append((x, v, band(r) if band else None))
    for i, (label, points) in enumerate(sorted(series.items(), key=lambda kv: kv[0])):
        points.sort(key=lambda p: p[0])
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        # Distinct markers keep a series visible where it lies exactly on top of another.
        (line,) = ax.plot(xs, ys, marker=MARKERS[i % len(MARKERS)], markersize=8 - 2 * (i % 3), label=label)
        bars = [(x, v, b) for x, v, b in points if b is not None]
        if bars:
            lo = [max(v - b[0], 0.0) for _, v, b in bars]
            hi = [max(b[1] - v, 0.0) for _, v, b in bars]
            ax.errorbar([p[0] for p in bars], [p[1] for p in bars], yerr=[lo, hi], fmt="none", capsize=4,
                        color=line.get_color())
    return sum(len(p) for p in series.values())


def _iqr(row: Row) -> tuple[float, float] | None:
    q1, q3 = _number(row.get("speed_ratio_q1")), _number(row.get("speed_ratio_q3"))
    return None if q1 is None or q3 is None else (q1, q3)


def _baseline_lines(ax: Axes, rows: list[Row], y: Callable[[Row], float | None]) -> None:
    """Every job measures its own baseline; the median per model is the reference the lines are judged by."""
    by_model: dict[Any, list[float]] = {}
    for r in rows:
        v = y(r)
        if v is not None:
            by_model.setdefault(r["model"], []).append(v)
    for i, (model, values) in enumerate(sorted(by_model.items(), key=lambda kv: str(kv[0]))):
        label = "baseline" if len(by_model) == 1 else f"baseline · {model}"
        ax.axhline(statistics.median(values), color="0.35", linestyle=(0, (5, 3 + 2 * i)), linewidth=1.2, label=label)


def _finish(ax: Axes, rows: list[Row], title: str, ylabel: str, n_points: int) -> None:
    ax.set_title(title, fontsize=11)
    ax.set_xlabel("compressed layers")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if n_points == 0:
        ax.text(0.5, 0.5, "no data (no job got this far)", transform=ax.transAxes, ha="center", color="0.4")
    # Tick every swept layer count (few of them), labelling "all" sweeps with the count they resolved to.
    ticks: dict[int, str] = {}
    for r in rows:
        x = layers_x(r)
        if x is not None:
            ticks[x] = f"all ({x})" if r["layers"] == "all" else str(x)
    if 0 < len(ticks) <= 12:
        ax.set_xticks(sorted(ticks), [ticks[x] for x in sorted(ticks)])
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _figure(n_axes: int = 1) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=(6.2 * n_axes, 4.0), layout="constrained")
    axes = fig.subplots(1, n_axes, squeeze=False)[0]
    return fig, list(axes)


def _mib(key: str) -> Callable[[Row], float | None]:
    return lambda r: None if _number(r[key]) is None else _number(r[key]) / MIB


def _field(key: str) -> Callable[[Row], float | None]:
    return lambda r: _number(r[key])


def memory_plot(rows: list[Row]) -> bytes:
    kinds = {r["memory_kind"] for r in rows if r["memory_kind"]}
    what = "GPU memory" if kinds == {"cuda"} else "RSS" if kinds == {"cpu_rss"} else "memory"
    fig, (abs_ax, ratio_ax) = _figure(2)
    n = _plot_series(abs_ax, rows, _mib("compressed_peak_bytes"))
    _baseline_lines(abs_ax, rows, _mib("baseline_peak_bytes"))
    _finish(abs_ax, rows, f"Peak {what} vs compressed layers", f"peak {what} (MiB)", n)
    n = _plot_series(ratio_ax, rows, _field("peak_memory_ratio"))
    ratio_ax.axhline(1.0, color="0.35", linestyle="--", linewidth=1.2, label="baseline (1×)")
    _finish(ratio_ax, rows, f"Peak {what}, compressed / baseline", "peak memory ratio", n)
    return _png(fig)


def throughput_plot(rows: list[Row]) -> bytes:
    fig, (tok_ax, slow_ax) = _figure(2)
    n = _plot_series(tok_ax, rows, _field("compressed_tok_s"))
    _baseline_lines(tok_ax, rows, _field("baseline_tok_s"))
    _finish(tok_ax, rows, "Decode throughput vs compressed layers", "tokens/s", n)
    # The paired rounds' median ratio, its IQR as error bars; a job from before the rounds falls back to
    # 1 / slowdown (no bars).
    n = _plot_series(slow_ax, rows, _speed_ratio, _iqr)
    slow_ax.axhline(1.0, color="0.35", linestyle="--", linewidth=1.2, label="baseline (1×)")
    _finish(slow_ax, rows, "Speed ratio vs baseline (paired rounds, IQR bars)", "baseline time / compressed time", n)
    return _png(fig)


def _speed_ratio(row: Row) -> float | None:
    ratio = _number(row.get("speed_ratio"))
    slowdown = _number(row.get("slowdown"))
    return ratio if ratio is not None else (1 / slowdown if slowdown else None)


def decompressions_plot(rows: list[Row]) -> bytes:
    fig, (ax,) = _figure()
    n = _plot_series(ax, rows, _field("decompressions_per_forward_pass"))
    _finish(ax, rows, "Decompressions per forward pass", "decompressions / forward pass", n)
    return _png(fig)


def compression_ratio_plot(rows: list[Row]) -> bytes:
    fig, (ax,) = _figure()
    n = _plot_series(ax, rows, _field("compression_ratio"))
    ax.axhline(1.0, color="0.35", linestyle="--", linewidth=1.2, label="uncompressed (1×)")
    _finish(ax, rows, "Compression ratio vs compressed layers", "original / compressed bytes", n)
    return _png(fig)


# File stem -> renderer; write_report saves `<stem>.png` and the dashboard embeds them in this order.
PLOTS: dict[str, Callable[[list[Row]], bytes]] = {
    "memory_vs_layers": memory_plot,
    "throughput_vs_layers": throughput_plot,
    "decompressions_vs_layers": decompressions_plot,
    "compression_ratio_vs_layers": compression_ratio_plot,
}


def render_plots(rows: list[Row]) -> dict[str, bytes]:
    return {stem: render(rows) for stem, render in PLOTS.items()}
