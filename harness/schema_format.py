"""How harness.schema's fields print: the summary's cells and lines, the report's cells. Kept apart from the
field table so that the table reads as one list; every function here is named by a field in harness/schema.py."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

SIDES = ("baseline", "compressed")
Results = dict[str, Any]


def mb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e6:,.1f} MB"


def mib(v: Any) -> str:
    return f"{v / 2**20:,.1f}" if isinstance(v, int | float) else str(v)


def num(spec: str, suffix: str = "") -> Callable[[Any], str]:
    """A number formatted by `spec`; anything else (a string from an odd results.json) as it is."""
    return lambda v: format(v, spec) + suffix if isinstance(v, int | float) and not isinstance(v, bool) else str(v)


def yes_no(v: bool | None) -> str | None:
    return None if v is None else "yes" if v else "NO"


def memory_kind(results: Results) -> str:
    """What the memory figures measure (one kind per run): the summary's labels say it."""
    return (results.get("baseline") or results.get("compressed") or {}).get("memory", {}).get("kind", "")


def compiled(results: Results) -> bool:
    return any((results.get(s) or {}).get("compile") for s in SIDES)


def paired(results: Results) -> bool:
    rounds = results.get("rounds") or {}
    return bool(rounds.get("baseline") and rounds.get("compressed"))


def in_kernel(results: Results) -> bool:
    return bool((results.get("compressed") or {}).get("in_kernel_decodes"))


def comparison_of(results: Results) -> dict[str, Any]:
    return results.get("comparison") or {}


def compressed_of(results: Results) -> dict[str, Any]:
    return results.get("compressed") or {}


def speed_ratio_text(cmp_: dict[str, Any], rounds: dict[str, Any] | None) -> str:
    """`0.82x  (IQR 0.81-0.89, 10 paired rounds, two_models)`; without rounds, the unpaired ratio says so."""
    ratio, q1, q3 = cmp_.get("speed_ratio"), cmp_.get("speed_ratio_q1"), cmp_.get("speed_ratio_q3")
    if ratio is None:  # a results.json from before the paired rounds
        return "-"
    if not cmp_.get("rounds") or q1 is None:
        return f"{ratio:.3f}x  (unpaired: phase medians, no rounds yet)"
    how = f", {rounds['mechanism']}" if rounds else ""
    return f"{ratio:.3f}x  (IQR {q1:.3f}-{q3:.3f}, {cmp_['rounds']} paired rounds{how})"


def speed_cell(r: dict[str, Any]) -> str | None:
    """Baseline / compressed time, the paired rounds' median with its quartiles: "0.82 [0.81-0.89]"."""
    ratio, q1, q3 = r.get("speed_ratio"), r.get("speed_ratio_q1"), r.get("speed_ratio_q3")
    if not isinstance(ratio, int | float):
        return None
    both = isinstance(q1, int | float) and isinstance(q3, int | float)
    return f"{ratio:.2f} [{q1:.2f}-{q3:.2f}]" if both else f"{ratio:.2f}"


def compression_line(res: Results) -> str:
    c = compressed_of(res)
    hit = ", artifact cache hit)" if c.get("artifact_cache_hit") else ")"
    return (f"{c['compression_ratio']:.3f}x  ({mb(c['original_bytes'])} -> {mb(c['compressed_bytes'])}, "
            f"{c['compress_time_s']:.2f} s" + hit)


def outputs_line(res: Results) -> str:
    c = comparison_of(res)
    diff = c["max_abs_logit_diff"]
    return (f"{'✓' if c['outputs_match'] else '✗'}  (token ids {'equal' if c['token_ids_match'] else 'DIFFER'}, "
            f"logits {'bit-identical' if c['logits_equal'] else 'DIFFER'}, "
            f"max |dlogit| {diff if diff is not None else 'n/a'})")


def lossless_line(res: Results) -> str | None:
    c = comparison_of(res)
    if "weights_lossless" not in c:  # a results.json written before issue 12
        return None
    checked = f"{c.get('weights_checked_layers')}/{compressed_of(res).get('layers_compressed', '?')} layers"
    verdict = "✓" if c["weights_lossless"] else "not established"
    return f"{verdict}  ({checked} decoded and checked against the originals)"


def reference_line(res: Results) -> str | None:
    c = comparison_of(res)
    if "exactness_reference" not in c:
        return None
    return {True: "✓  (same kernel on the uncompressed weights: logits bit-identical)",
            False: "✗  (same kernel on the uncompressed weights: logits DIFFER)",
            None: "n/a  (no fused kernel ran: nothing to compare it with)"}[c["exactness_reference"]]


def agreement_line(res: Results) -> str | None:
    v = comparison_of(res).get("token_agreement")
    return None if v is None else f"{v:.1%}  (greedy tokens equal to baseline's)"


def memory_label(what: str) -> str:
    return f"memory {what} ({{memory_kind}})"
