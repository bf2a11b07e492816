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


# What `slow` means: the test starts a process (the CLI, a sweep, an engine) or loads the real SmolLM2 model. Marked
# by rule, not by hand, so a new test is marked as soon as it does either: `pytest -m "not slow"` is the inner loop
# (library code, tiny in-process models); CI runs everything.
_SLOW_SOURCE = ("run_harness(", "subprocess", "Popen", "smollm2", "_multirun(", "fidelity_run(")


def pytest_collection_modifyitems(config, items):
    import inspect

    for item in items:
        fn = getattr(item, "function", None)
        if fn is None or item.get_closest_marker("slow"):
            continue
        try:
            source = inspect.getsource(fn)
        except (OSError, TypeError):
            continue
        if "harness_cli" in getattr(item, "fixturenames", ()) or any(s in source for s in _SLOW_SOURCE):
            item.add_marker(pytest.mark.slow)
