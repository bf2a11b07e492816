"""harness.schema: one declaration per results.json field, from which the summary, the sweep report's columns, the
W&B keys and README's results.json tables derive. Adding a field is one entry in FIELDS: shown here by doing it."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from unittest.mock import MagicMock

import pytest
from test_report import make_results, write_job

from harness import schema
from harness.measure import MemoryReading
from harness.report.collect import COLUMNS, collect, columns
from harness.report.tables import to_csv, to_markdown
from harness.report.wandb_workspace import build_panels
from harness.results import summary_table
from harness.runtime.compress import CompressionReport
from harness.runtime.stats import Stats
from harness.schema import FIELDS, Field, num
from harness.tracking import wandb_summary

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_results_tables_are_the_schemas():
    text = README.read_text(encoding="utf-8")
    assert schema.README_START in text and schema.README_END in text
    assert text == schema.with_readme_table(text), "README is out of date: run `python -m harness.schema`"


def test_results_file_records_its_schema_version(tmp_path):
    from harness.results import ResultsFile

    ResultsFile(tmp_path / "results.json", {"model": {}}, [])
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["schema_version"] == schema.SCHEMA_VERSION and list(data)[0] == "schema_version"


def test_paths_are_unique_and_every_field_is_described():
    paths = [f.path for f in FIELDS]
    assert len(paths) == len(set(paths))
    assert all(f.description for f in FIELDS)
    names = [name for name, _, _ in schema.report_columns()]
    assert len(names) == len(set(names)) and not set(names) & {"job", "status", "model"}
    for f in FIELDS:  # a summary label is either a side-by-side row or a line, never neither or both
        assert f.label is None or (f.fmt is None) != (f.line is None), f.path


def test_produced_keys_are_in_the_schema():
    """What the producers write under `compressed/` (the exact counters, the compression report, the memory
    reading) is declared; the full pipeline's keys are checked in tests/test_rounds.py."""
    declared = {f.key(side) for f in FIELDS for side in schema.SIDES}
    produced = [*Stats().snapshot(), *CompressionReport(1, 2, 3, 4, 0.5).as_dict()]
    produced += [f"memory/{k}" for k in MemoryReading("cuda", 1, 2, 3).as_dict()]
    assert {f"compressed/{k}" for k in produced} <= declared


def test_wandb_keys_are_schema_paths():
    assert schema.wandb_key("{side}/tokens_per_s", "baseline") == "baseline/tokens_per_s"
    with pytest.raises(KeyError, match="no field"):
        schema.wandb_key("compressed/tokens_per_sec")
    res = make_results(1, 20, "per_forward_pass")
    summary = wandb_summary(res)
    assert {"compressed/tokens_per_s", "comparison/slowdown", "compressed/memory/peak_bytes"} <= set(summary)
    assert {key for key, _ in schema.panel_keys()} <= set(summary)


def full_results() -> dict:
    """test_report's results.json plus what only the summary reads (the report never needed it)."""
    res = make_results(1, 20, "per_forward_pass")
    res["baseline"]["repeats"] = 3
    res["comparison"].update(token_ids_match=True, logits_equal=True, weights_bytes_ratio=0.9, speed_ratio=0.5)
    return res


@pytest.fixture
def new_fields():
    """Two fields added the way a newcomer adds them: appended to FIELDS (a phase figure and a comparison)."""
    added = [
        Field("{side}/first_token_ms", "ms", "time to the first token", "first token", num(".1f", " ms"),
              column="{side}_first_token_ms", header="{s} 1st tok ms", cell=num(".0f"), panel="first token ms"),
        Field("comparison/first_token_ratio", "x", "baseline / compressed first-token time", "first token ratio",
              line=lambda r: f"{r['comparison']['first_token_ratio']:.2f}x", column="first_token_ratio",
              header="1st tok ratio", cell=num(".2f")),
    ]
    FIELDS.extend(added)
    try:
        yield added
    finally:
        del FIELDS[-len(added):]


def test_a_new_field_shows_in_summary_report_and_wandb(new_fields, tmp_path):
    res = full_results()
    res["baseline"]["first_token_ms"], res["compressed"]["first_token_ms"] = 12.25, 31.5
    res["comparison"]["first_token_ratio"] = 12.25 / 31.5

    text = summary_table(res)
    assert any(line.startswith("first token ") and line.endswith("12.2 ms               31.5 ms")
               for line in text.splitlines()), text
    assert "first token ratio" in text and "0.39x" in text

    write_job(tmp_path, 0, res, res["overrides"], res["config"])
    (row,) = collect(tmp_path)
    assert (row["baseline_first_token_ms"], row["compressed_first_token_ms"]) == (12.25, 31.5)
    assert row["first_token_ratio"] == pytest.approx(0.389, abs=1e-3)
    assert set(row) == set(columns()) == set(COLUMNS) | {"baseline_first_token_ms", "compressed_first_token_ms",
                                                          "first_token_ratio"}
    (csv_row,) = csv.DictReader(io.StringIO(to_csv([row])))
    assert csv_row["compressed_first_token_ms"] == "31.5"
    md = to_markdown([row]).splitlines()
    cells = dict(zip(md[0].split(" | "), md[2].split(" | "), strict=True))
    assert (cells["base 1st tok ms"], cells["comp 1st tok ms"], cells["1st tok ratio"]) == ("12", "32", "0.39")

    summary = wandb_summary(res)
    assert summary["compressed/first_token_ms"] == 31.5 and "comparison/first_token_ratio" in summary
    assert ("compressed/first_token_ms", "first token ms") in schema.panel_keys()
    wr = MagicMock()  # the W&B report's panel classes, recorded (wandb-workspaces is an optional install)
    build_panels(wr)
    axes = [c.kwargs.get("display_name") for c in wr.ParallelCoordinatesPlotColumn.call_args_list]
    assert "first token ms" in axes and "slowdown" in axes
    assert "`{side}/first_token_ms` | ms | time to the first token | first token |" in schema.readme_table()


def test_results_from_before_a_field_print_and_report_without_it(new_fields, tmp_path):
    """A results.json written before a field existed: no line for it, a dash in its row, None in its column."""
    res = full_results()
    text = summary_table(res)
    assert "first token ratio" not in text
    assert [line.split() for line in text.splitlines() if line.startswith("first token")] == [["first", "token", "-", "-"]]
    write_job(tmp_path, 0, res, res["overrides"], res["config"])
    assert collect(tmp_path)[0]["first_token_ratio"] is None
