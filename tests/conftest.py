import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def run_harness(args: list[str], cwd: Path, timeout: int = 600, env: dict | None = None):
    """`python -m harness ARGS` in a subprocess, as a user types it."""
    import subprocess

    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "harness", *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def harness_cli():
    return run_harness


def assert_refused(proc, message: str) -> str:
    """Bad input as a user must see it: exit code 2, one `error:` line naming `message`, at most 3 lines of
    output in all (no summary table of dashes, no traceback). Returns the error line."""
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(errors) == 1 and message in errors[0], lines
    assert len(lines) <= 3 and "Traceback" not in proc.stderr and "RESULTS SUMMARY" not in proc.stdout, lines
    return errors[0]
