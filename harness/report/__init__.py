"""Sweep report: one row per Hydra job (from its results.json), as CSV, markdown, PNG plots and an HTML dashboard.

collect(sweep_dir) gives the rows; write_report(sweep_dir) writes every file into the sweep dir; the
SweepReport Hydra callback calls it after each job, `python -m harness.report DIR` rebuilds it by hand.
"""

from harness.report.collect import COLUMNS, collect
from harness.report.write import write_report

__all__ = ["COLUMNS", "collect", "write_report"]
