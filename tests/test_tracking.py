"""W&B tracking (harness/tracking.py) as a user meets it: online mode without credentials warns and the run
completes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import pythonpath


def test_wandb_online_without_credentials_warns_and_completes(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "WANDB_MODE")}
    env.update(PYTHONPATH=pythonpath(), HOME=str(tmp_path / "home"), MPLCONFIGDIR=str(tmp_path / "mpl"))
    run_dir = tmp_path / "run"
    args = ["model=tiny", "logger=wandb", "logger.mode=online", "compress.layers=2", "generate.max_new_tokens=2",
            "generate.repeats=1", f"compress.artifact_dir={tmp_path / 'artifacts'}", f"hydra.run.dir={run_dir}"]
    proc = subprocess.run([sys.executable, "-m", "harness", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "W&B could not start" in proc.stdout + proc.stderr
    assert json.loads((run_dir / "results.json").read_text())["status"] == "completed"
