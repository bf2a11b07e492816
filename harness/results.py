"""results.json (written as soon as each phase exists, atomically) and the printed summary."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from harness.atomic import write_atomic


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
        self.data: dict[str, Any] = {"status": "running", "error": None, "config": config, "overrides": overrides}
        self.write()

    def update(self, **sections: Any) -> None:
        self.data.update(sections)
        self.write()

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, json.dumps(_clean(self.data), indent=2))


SIDES = ("baseline", "compressed")


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:,.1f} MB"


def speed_ratio_text(cmp_: dict[str, Any], rounds: dict[str, Any] | None) -> str:
    """`0.82x  (IQR 0.81-0.89, 10 paired rounds, two_models)`; without rounds, the unpaired ratio says so."""
    ratio, q1, q3 = cmp_.get("speed_ratio"), cmp_.get("speed_ratio_q1"), cmp_.get("speed_ratio_q3")
    if ratio is None:  # a results.json from before the paired rounds
        return "-"
    if not cmp_.get("rounds") or q1 is None:
        return f"{ratio:.3f}x  (unpaired: phase medians, no rounds yet)"
    how = f", {rounds['mechanism']}" if rounds else ""
    return f"{ratio:.3f}x  (IQR {q1:.3f}-{q3:.3f}, {cmp_['rounds']} paired rounds{how})"


def exactness_lines(cmp_: dict[str, Any], comp: dict[str, Any], w: int) -> list[str]:
    """Weights lossless, token agreement, exactness reference (README: "Reading the results"); a results.json
    written before these existed has none of them, and prints none."""
    lines = []
    if "weights_lossless" in cmp_:
        checked = f"{cmp_.get('weights_checked_layers')}/{comp.get('layers_compressed', '?')} layers"
        verdict = "✓" if cmp_["weights_lossless"] else "not established"
        lines.append(f"{'weights lossless':<{w}}{verdict}  ({checked} decoded and checked against the originals)")
    if cmp_.get("token_agreement") is not None:
        lines.append(f"{'token agreement':<{w}}{cmp_['token_agreement']:.1%}  (greedy tokens equal to baseline's)")
    if "exactness_reference" in cmp_:
        ref = cmp_["exactness_reference"]
        text = {True: "✓  (same kernel on the uncompressed weights: logits bit-identical)",
                False: "✗  (same kernel on the uncompressed weights: logits DIFFER)",
                None: "n/a  (no fused kernel ran: nothing to compare it with)"}[ref]
        lines.append(f"{'exactness reference':<{w}}{text}")
    return lines


def summary_table(results: dict[str, Any]) -> str:
    """The prototype's RESULTS SUMMARY, side by side, every figure with its unit."""
    cfg, base, comp = results["config"], results.get("baseline"), results.get("compressed")
    cmp_ = results.get("comparison", {})
    rows: list[tuple[str, str, str]] = []

    def row(label: str, key, fmt=str) -> None:
        def get(phase):
            if phase is None:
                return "-"
            v = key(phase) if callable(key) else phase.get(key)
            return "-" if v is None else fmt(v)

        rows.append((label, get(base), get(comp)))

    if (base or {}).get("compile") or (comp or {}).get("compile"):
        row("compiled", "compile", lambda v: str(v) if v else "no")
        row("warm-up (compile + capture)", "warmup_time_s", lambda v: f"{v:.1f} s")
    n = base["repeats"] if base else 0
    row(f"time (median of {n})", "time_s", lambda v: f"{v:.3f} s")
    row("time min-max", lambda p: (p["time_s_min"], p["time_s_max"]), lambda v: f"{v[0]:.3f}-{v[1]:.3f} s")
    paired = results.get("rounds") or {}
    if paired.get("baseline") and paired.get("compressed"):  # the figures the speed ratio is computed from
        rows.append((f"time, {paired['rounds']} paired rounds", *(f"{paired[s]['time_s']:.3f} s" for s in SIDES)))
    row("gpu time (CUDA events)", "gpu_time_s", lambda v: f"{v:.3f} s")
    row("host overhead / generation", "host_overhead_s", lambda v: f"{v * 1e3:.1f} ms")
    row("tokens/s", "tokens_per_s", lambda v: f"{v:.2f}")
    row("forward passes", "forward_passes")
    mem_kind = (base or comp or {}).get("memory", {}).get("kind", "")
    for label, k in (("before", "before_bytes"), ("after", "after_bytes"), ("peak", "peak_bytes"), ("delta", "delta_bytes")):
        row(f"memory {label} ({mem_kind})", lambda p, k=k: p["memory"][k], _mb)
    row("weights held (exact)", lambda p: p["memory"]["weights_bytes"], _mb)
    row("decompressions", "decompressions")
    row("decompressions / pass", "decompressions_per_forward_pass", lambda v: f"{v:.1f}")
    row("decompress time", "decompress_time_s", lambda v: f"{v:.3f} s")
    row("peak decompressed resident", "peak_resident_decompressed_bytes", _mb)
    if (comp or {}).get("in_kernel_decodes"):  # cache=fused: layers the kernel decoded in registers, never written
        row("decoded in-kernel / pass", "in_kernel_decodes_per_forward_pass", lambda v: f"{v:.1f} layers")
        row("tiles decoded in-kernel", "in_kernel_tiles", lambda v: f"{v:,}")

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
    if comp:
        lines.append(f"{'layers compressed':<{w}}{comp['layers_compressed']}/{comp['layers_total']}")
        lines.append(
            f"{'compression ratio':<{w}}{comp['compression_ratio']:.3f}x  "
            f"({_mb(comp['original_bytes'])} -> {_mb(comp['compressed_bytes'])}, {comp['compress_time_s']:.2f} s"
            + (", artifact cache hit)" if comp.get("artifact_cache_hit") else ")")
        )
    if cmp_:
        lines.append(f"{'speed ratio (base/comp)':<{w}}{speed_ratio_text(cmp_, results.get('rounds'))}")
        lines.append(f"{'slowdown':<{w}}{cmp_['slowdown']:.2f}x  (1 / speed ratio)")
        lines.append(f"{'peak memory ratio':<{w}}{cmp_['peak_memory_ratio']:.3f}  ({mem_kind})")
        lines.append(f"{'weights held ratio':<{w}}{cmp_['weights_bytes_ratio']:.3f}  (exact)")
        mark = "✓" if cmp_["outputs_match"] else "✗"
        diff = cmp_["max_abs_logit_diff"]
        lines.append(
            f"{'outputs match':<{w}}{mark}  (token ids {'equal' if cmp_['token_ids_match'] else 'DIFFER'}, "
            f"logits {'bit-identical' if cmp_['logits_equal'] else 'DIFFER'}, max |dlogit| {diff if diff is not None else 'n/a'})"
        )
        lines += exactness_lines(cmp_, comp or {}, w)
    fid = results.get("fidelity")
    if fid:
        lines.append(f"{'fidelity (lm-eval)':<{w}}{fid['verdict']}")
    if results.get("status") == "failed":
        lines.append(f"FAILED: {results.get('error')}")
    lines.append("=" * 72)
    return "\n".join(lines)
