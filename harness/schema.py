"""The one schema of results.json: every measured field once, with its unit, its meaning and where it shows.
(Past 300 lines because it is a data table: one entry per field.)

The printed summary (harness.results), the sweep report's columns (harness.report: comparison.csv/.md, the
dashboard), the W&B report's panels (harness.report.wandb_workspace) and README's results.json table
(`python -m harness.schema`) all derive from FIELDS. Adding a field is one entry here (the code that measures it
writes it into results.json under `path`) plus its test. The producers (phases/phase.py, CompressionReport,
Stats.snapshot, compare) still build their own dicts: the schema describes their keys, and tests fail when a
produced key is missing here (undeclared(): tests/test_schema.py for the producers, tests/test_rounds.py for a
whole run).

Order matters: the summary prints rows and lines in FIELDS order, and the report's columns follow it too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from harness.schema_format import (
    SIDES,
    Results,
    agreement_line,
    comparison_of,
    compiled,
    compressed_of,
    compression_line,
    in_kernel,
    lossless_line,
    mb,
    memory_kind,
    memory_label,
    mib,
    num,
    outputs_line,
    paired,
    reference_line,
    speed_cell,
    speed_ratio_text,
    yes_no,
)

SIDE_ABBR = {"baseline": "base", "compressed": "comp"}  # report headers: "base tok/s", "comp tok/s"


@dataclass(frozen=True)
class Field:
    """One results.json field. `path` is "/"-separated, as the W&B summary key is; `{side}` in it stands for each
    of SIDES. Presentation, each optional:
    - summary `label` + `fmt`: a baseline | compressed row (a `compressed/...` path leaves the baseline cell "-");
    - summary `label` + `line`: one line of free text from the whole results, after the rows (None: no line);
    - `column`: comparison.csv column (`{side}` in it: one per side; none: compressed's value, else baseline's),
      with `header` + `cell` (value -> text) or `row_cell` (report row -> text) for the markdown and dashboard;
    - `panel`: the W&B report's parallel-coordinates axis name (compressed's value for a `{side}` field)."""

    path: str
    unit: str
    description: str
    label: str | None = None
    fmt: Callable[[Any], str] | None = None
    line: Callable[[Results], str | None] | None = None
    when: Callable[[Results], bool] | None = None  # summary row shown only when this holds
    get: Callable[[Results, str], Any] | None = None  # summary cell value when it is not just `path`
    column: str | None = None
    header: str | None = None
    cell: Callable[[Any], Any] | None = None
    row_cell: Callable[[dict[str, Any]], Any] | None = None
    panel: str | None = None

    @property
    def per_side(self) -> bool:
        return "{side}" in self.path

    def key(self, side: str = "compressed") -> str:
        """The results.json path (and W&B summary key) of this field, for one side."""
        return self.path.format(side=side)

    def value(self, results: Results, side: str) -> Any:
        """This field of one side (None where the side has no such field, or it was not written)."""
        if self.get is not None:
            return self.get(results, side)
        if not self.per_side and not self.path.startswith(f"{side}/"):
            return None
        return lookup(results, self.key(side))


def written(results: Any, path: str) -> bool:
    """Whether results.json has the key at `path` (its value may be null)."""
    *parents, last = path.split("/")
    parent = lookup(results, "/".join(parents)) if parents else results
    return isinstance(parent, dict) and last in parent


def lookup(results: Any, path: str) -> Any:
    for k in path.split("/"):
        if not isinstance(results, dict):
            return None
        results = results.get(k)
    return results


S3 = num(".3f", " s")
_F = Field
FIELDS: list[Field] = [
    # -- each phase ({side}: baseline, compressed; harness/phases/phase.py) --
    _F("{side}/compile", "", "what torch.compile did: `cudagraphs`, `inductor`, or false (eager)",
       "compiled", lambda v: str(v) if v else "no", when=compiled),
    _F("{side}/compile_details", "", "torch.compile's counters (compiled runs only)"),
    _F("{side}/warmup", "generations", "untimed generations before the timed ones"),
    _F("{side}/warmup_time_s", "s", "time of the untimed generations (compilation and graph capture happen here)",
       "warm-up (compile + capture)", num(".1f", " s"), when=compiled),
    _F("{side}/time_s", "s", "median time of one timed generation", "time (median of {repeats})", S3),
    _F("{side}/time_s_min", "s", "fastest timed generation", "time min-max", lambda v: f"{v[0]:.3f}-{v[1]:.3f} s",
       get=lambda r, s: (lambda p: None if p is None else (p["time_s_min"], p["time_s_max"]))(r.get(s))),
    _F("{side}/time_s_max", "s", "slowest timed generation"),
    _F("rounds/{side}/time_s", "s", "median time of one generation over the paired rounds",
       "time, {rounds} paired rounds", S3, when=paired),
    _F("{side}/gpu_time_s", "s", "median time between CUDA events around each generation (null on the CPU)",
       "gpu time (CUDA events)", S3),
    _F("{side}/host_overhead_s", "s", "median wall time outside the CUDA-event window (null on the CPU)",
       "host overhead / generation", lambda v: f"{v * 1e3:.1f} ms"),
    _F("{side}/repeats", "generations", "timed generations"),
    _F("{side}/new_tokens", "tokens", "tokens generated by one generation, over all prompts"),
    _F("{side}/tokens_per_s", "tokens/s", "new_tokens / time_s", "tokens/s", num(".2f"),
       column="{side}_tok_s", header="{s} tok/s", cell=num(".1f"), panel="tokens/s"),
    _F("{side}/forward_passes", "passes", "forward passes of one generation (one per generated token)",
       "forward passes", str, column="forward_passes", header="fwd passes"),
    _F("{side}/counts_consistent", "", "every timed generation gave the same counts"),
    _F("{side}/memory/kind", "", "`cuda` (torch allocator) or `cpu_rss` (process RSS, sampled every 2 ms)",
       column="memory_kind"),
    _F("{side}/memory/before_bytes", "bytes", "memory at the start of the phase", memory_label("before"), mb),
    _F("{side}/memory/after_bytes", "bytes", "memory at the end of the phase", memory_label("after"), mb),
    _F("{side}/memory/peak_bytes", "bytes", "peak memory during the phase", memory_label("peak"), mb,
       column="{side}_peak_bytes", header="{s} peak MiB", cell=mib, panel="peak bytes"),
    _F("{side}/memory/delta_bytes", "bytes", "after - before", memory_label("delta"), mb),
    _F("{side}/memory/weights_bytes", "bytes", "exact weight bytes on the model's device (dense + compressed there)",
       "weights held (exact)", mb),
    _F("{side}/outputs_stable", "", "every timed generation produced the same tokens"),
    _F("{side}/output_texts", "", "the generated texts, one per prompt"),
    _F("{side}/output_token_ids", "", "the generated token ids, one list per prompt"),
    # -- the compressed phase's exact counters (harness/runtime/stats.py) --
    _F("compressed/decompressions", "decodes", "layer weights decoded in one generation", "decompressions", str,
       column="decompressions", header="decomps"),
    _F("compressed/decompressions_per_forward_pass", "decodes/pass", "decompressions / forward_passes",
       "decompressions / pass", num(".1f"), column="decompressions_per_forward_pass", header="decomps / pass",
       cell=num(".3g"), panel="decompressions/pass"),
    _F("compressed/decompressions_per_pass", "decodes", "decompressions of each forward pass"),
    _F("compressed/decompressions_per_layer", "decodes", "decompressions of each compressed layer"),
    _F("compressed/decompress_time_s", "s", "host time spent decoding (`-` compiled: decodes run in the graphs)",
       "decompress time", S3),
    _F("compressed/bytes_decompressed", "bytes", "dense bytes decoded in one generation"),
    _F("compressed/peak_resident_decompressed_bytes", "bytes", "peak bytes of decoded weights held at once",
       "peak decompressed resident", mb),
    _F("compressed/in_kernel_decodes", "decodes", "layers the fused kernel decoded in registers (`cache=fused`)"),
    _F("compressed/in_kernel_decodes_per_forward_pass", "decodes/pass", "in_kernel_decodes / forward_passes",
       "decoded in-kernel / pass", num(".1f", " layers"), when=in_kernel),
    _F("compressed/in_kernel_decodes_per_pass", "decodes", "in-kernel decodes of each forward pass"),
    _F("compressed/in_kernel_decodes_per_layer", "decodes", "in-kernel decodes of each compressed layer"),
    _F("compressed/in_kernel_tiles", "tiles", "16-row tiles the fused kernel decoded", "tiles decoded in-kernel",
       num(","), when=in_kernel),
    # -- the compression report (harness/runtime/compress.py CompressionReport) --
    _F("compressed/layers_compressed", "layers", "layers stored compressed", "layers compressed",
       line=lambda r: f"{compressed_of(r)['layers_compressed']}/{compressed_of(r)['layers_total']}", column="layers_compressed",
       panel="layers compressed"),
    _F("compressed/layers_total", "layers", "linear layers of the model (tied weights included)",
       column="layers_total"),
    _F("compressed/original_bytes", "bytes", "dense bytes of the compressed layers"),
    _F("compressed/compressed_bytes", "bytes", "compressed bytes of those layers"),
    _F("compressed/compression_ratio", "x", "original_bytes / compressed_bytes", "compression ratio",
       line=compression_line, column="compression_ratio", header="compr. ratio", cell=num(".3f"),
       panel="compression ratio"),
    _F("compressed/compress_time_s", "s", "time to compress (artifact cache included)"),
    _F("compressed/skipped_layers", "", "selected layers left dense, with the reason"),
    _F("compressed/artifact_cache_hit", "", "the compressed layers came from the artifact cache (null: no cache)"),
    _F("compressed/artifact_path", "", "the artifact cache file"),
    _F("compressed/artifact_time_s", "s", "hashing the weights + reading or writing the artifact"),
    # -- compressed against baseline (harness/phases/phase.py compare, runtime.lossless, exactness.py) --
    _F("comparison/speed_ratio", "x", "median over the paired rounds of baseline time / compressed time",
       "speed ratio (base/comp)", line=lambda r: speed_ratio_text(comparison_of(r), r.get("rounds")),
       column="speed_ratio", header="speed ratio [IQR]", row_cell=speed_cell),
    _F("comparison/speed_ratio_q1", "x", "first quartile of the per-round ratios", column="speed_ratio_q1"),
    _F("comparison/speed_ratio_q3", "x", "third quartile of the per-round ratios", column="speed_ratio_q3"),
    _F("comparison/rounds", "rounds", "paired rounds timed (0: unpaired)", column="rounds"),
    _F("comparison/speed_ratio_per_round", "x", "each round's ratio"),
    _F("comparison/rounds_mechanism", "", "`two_models` (a dense twin) or `same_model` (nothing compressed)"),
    _F("comparison/rounds_outputs_match", "", "every round's outputs matched"),
    _F("comparison/sequential_speed_ratio", "x", "ratio of the two phases' medians (unpaired: host drift in it)"),
    _F("comparison/slowdown", "x", "1 / speed_ratio", "slowdown", line=lambda r: f"{comparison_of(r)['slowdown']:.2f}x  "
       "(1 / speed ratio)", column="slowdown", header="slowdown", cell=num(".2f"), panel="slowdown"),
    _F("comparison/peak_memory_ratio", "x", "compressed / baseline peak memory", "peak memory ratio",
       line=lambda r: f"{comparison_of(r)['peak_memory_ratio']:.3f}  ({memory_kind(r)})", column="peak_memory_ratio",
       header="mem ratio", cell=num(".3f"), panel="memory ratio"),
    _F("comparison/weights_bytes_ratio", "x", "compressed / baseline weights held", "weights held ratio",
       line=lambda r: f"{comparison_of(r)['weights_bytes_ratio']:.3f}  (exact)"),
    _F("comparison/token_ids_match", "", "the generated token ids are equal"),
    _F("comparison/logits_equal", "", "every step's logits are bit-identical (torch.equal)"),
    _F("comparison/outputs_match", "", "token_ids_match and logits_equal", "outputs match", line=outputs_line,
       column="outputs_match", header="outputs match", cell=yes_no),
    _F("comparison/max_abs_logit_diff", "logit", "largest absolute difference of a logit, over every step",
       column="max_abs_logit_diff"),
    _F("comparison/weights_lossless", "", "every compressed layer decoded and matched its checksum (null: unchecked)",
       "weights lossless", line=lossless_line, column="weights_lossless", header="lossless", cell=yes_no),
    _F("comparison/weights_checked_layers", "layers", "layers whose decode was checked"),
    _F("comparison/token_agreement", "share", "greedy tokens equal to baseline's, position by position",
       "token agreement", line=agreement_line, column="token_agreement", header="token agreement",
       cell=num(".1%")),
    _F("comparison/exactness_reference", "", "the same kernel fed the uncompressed weights gives the same logits "
       "(null: no fused kernel ran)", "exactness reference", line=reference_line, column="exactness_reference",
       header="exact vs reference", cell=yes_no),
    # -- eval=fidelity (harness/fidelity.py) --
    _F("fidelity/verdict", "", "lm-eval on both models: identical or how they differ", "fidelity (lm-eval)",
       line=lambda r: r["fidelity"]["verdict"], column="fidelity", header="fidelity"),
]

# results.json's layout version: a change that renames or removes a key, or changes a unit, increments it (adding a
# field does not), so that readers of older files can tell.
SCHEMA_VERSION = 1

# results.json's top-level keys; the sections FIELDS details are listed field by field below them in README.
SECTIONS: list[tuple[str, str]] = [
    ("`schema_version`", f"this layout's version ({SCHEMA_VERSION}): renaming or removing a key, or changing a unit, "
     "increments it; adding a field does not"),
    ("`status`, `error`", "`running` → `completed` or `failed`; `error` is the one-line reason (else null)"),
    ("`config`, `overrides`", "the resolved config and the command-line overrides"),
    ("`device`", "the device the run used"),
    ("`baseline`, `compressed`", "each phase's figures (`compressed` adds the decompression counters and the "
     "compression report): the `{side}/` and `compressed/` fields below"),
    ("`comparison`", "compressed against baseline: the `comparison/` fields below"),
    ("`rounds`", "the paired rounds: `mechanism`, `warmup_rounds`, `orders`, `outputs_match`, the ratios, and per "
     "side `time_s` (+ `_q1`, `_q3`), `times_s`, `gpu_times_s`, `forward_passes`, `decompressions` per round"),
    ("`layers`", "one row per compressed layer: name, shape, dtype, bytes, ratio, decompressions"),
    ("`fidelity`", "with `eval=fidelity`: `verdict`, per-task metrics and differences, forward-pass and "
     "decompression counts"),
]


def field(path: str) -> Field:
    """The field at `path` (as written in FIELDS, `{side}` included); KeyError names a path the schema lacks."""
    for f in FIELDS:
        if f.path == path:
            return f
    raise KeyError(f"no field {path!r} in harness.schema.FIELDS")


def undeclared(results: Results) -> list[str]:
    """Keys of the phases and the comparison in `results` that FIELDS does not declare (tests keep this empty).
    A dict value is one field (decompressions_per_layer), except `memory`, whose keys are fields of their own."""
    declared = {f.key(side) for f in FIELDS for side in SIDES}
    keys = []
    for section in (*SIDES, "comparison"):
        for k, v in (results.get(section) or {}).items():
            keys += [f"{section}/memory/{m}" for m in v] if k == "memory" else [f"{section}/{k}"]
    return [k for k in keys if k not in declared]


def wandb_key(path: str, side: str = "compressed") -> str:
    """W&B summary key of a schema field (harness.tracking logs results.json's sections flattened with "/")."""
    return field(path).key(side)


def panel_keys() -> list[tuple[str, str]]:
    """(W&B summary key, axis name) of every field the W&B report plots against the config."""
    return [(f.key(), f.panel) for f in FIELDS if f.panel]


def report_columns() -> list[tuple[str, Field, str | None]]:
    """(column, field, side) of every report column in FIELDS order; side None: compressed's value, else
    baseline's."""
    out = []
    for f in FIELDS:
        if f.column and "{side}" in f.column:
            out += [(f.column.format(side=s), f, s) for s in SIDES]
        elif f.column:
            out.append((f.column, f, None))
    return out


def column_value(results: Results, f: Field, side: str | None) -> Any:
    if side is not None:
        return lookup(results, f.key(side))
    values = (f.value(results, s) for s in ("compressed", "baseline")) if f.per_side else [lookup(results, f.path)]
    return next((v for v in values if v is not None), None)


def readme_table() -> str:
    """README's results.json tables: the top-level keys, then every field of FIELDS."""
    lines = ["| key | content |", "|---|---|", *(f"| {k} | {v} |" for k, v in SECTIONS), "",
             "Fields (`{side}` is `baseline` and `compressed`; W&B summary keys are the same paths):", "",
             "| field | unit | meaning | summary row | report column |", "|---|---|---|---|---|"]
    for f in FIELDS:
        summary = f.label.format(repeats="N", rounds="N", memory_kind="kind") if f.label else ""
        cells = [f"`{f.path}`", f.unit, f.description, summary, f.column or ""]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


# README's generated block sits between these two lines; `python -m harness.schema` rewrites what is between.
README_START = "<!-- results.json keys: generated from harness/schema.py by `python -m harness.schema` -->"
README_END = "<!-- end of the generated results.json keys -->"


def with_readme_table(readme: str) -> str:
    """README's text with the generated block replaced by readme_table()."""
    head, rest = readme.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    return f"{head}{README_START}\n{readme_table()}\n{README_END}{tail}"


if __name__ == "__main__":
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "README.md"
    path.write_text(with_readme_table(path.read_text(encoding="utf-8")), encoding="utf-8")
    print(f"rewrote the results.json tables in {path}")
