"""python -m harness.report SWEEP_DIR: rebuild the report of an existing (finished or interrupted) sweep."""

from __future__ import annotations

import argparse
import sys

from harness.errors import HarnessError
from harness.report.collect import collect
from harness.report.tables import to_markdown
from harness.report.write import write_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.report", description=__doc__)
    parser.add_argument("sweep_dir", help="a Hydra multirun dir, e.g. multirun/2025-01-01/12-00-00")
    args = parser.parse_args(argv)
    try:
        rows = collect(args.sweep_dir)
        if not rows:
            raise HarnessError(
                f"no Hydra jobs under {args.sweep_dir!r} (looked for */results.json and */.hydra/overrides.yaml)"
            )
        paths = write_report(args.sweep_dir, rows)
    except HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(to_markdown(rows))
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
