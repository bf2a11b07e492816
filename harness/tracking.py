"""Experiment tracking: W&B through Lightning's WandbLogger (offline unless asked), or nothing.

wandb is imported only when logger=wandb. A W&B failure (online without credentials, say) becomes a warning:
the run goes on and its results.json is complete.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, f"{key}/"))
        elif isinstance(v, (int, float, bool)) and not isinstance(v, type(None)):
            out[key] = v
    return out


class NullTracker:
    """logger=none: touches no W&B."""

    lightning_logger: Any = False
    sync_command: str | None = None

    def log_results(self, results: dict[str, Any], layer_rows: list[dict], fidelity_rows: list[dict] | None) -> None:
        pass

    def finish(self, failed: bool = False) -> None:
        pass


class WandbTracker(NullTracker):
    def __init__(self, cfg: dict[str, Any], config: dict[str, Any], run_dir: Path, job_name: str) -> None:
        from lightning.pytorch.loggers import WandbLogger

        mode = cfg.get("mode", "offline")
        self.lightning_logger = WandbLogger(
            project=cfg.get("project", "codecllm"),
            entity=cfg.get("entity"),
            name=job_name,
            save_dir=str(run_dir),
            offline=mode == "offline",
            mode=mode,
            group=cfg.get("group"),
            job_type=cfg.get("job_type"),
            tags=list(cfg.get("tags") or []),
            config=config,
        )
        self.run = self.lightning_logger.experiment  # starts the run now, so its files exist from the start
        self.sync_command = f"wandb sync {Path(self.run.dir).parent}" if mode == "offline" else None

    def log_results(self, results, layer_rows, fidelity_rows):
        import wandb

        sections = {k: results[k] for k in ("baseline", "compressed", "comparison") if isinstance(results.get(k), dict)}
        summary = _flat(sections)
        summary["status"] = results.get("status")
        if results.get("fidelity"):
            summary["fidelity/verdict"] = results["fidelity"]["verdict"]
            for task, t in results["fidelity"]["tasks"].items():
                summary[f"fidelity/{task}/max_abs_loglikelihood_diff"] = t["max_abs_loglikelihood_diff"]
                summary[f"fidelity/{task}/samples_differing"] = t["samples_differing"]
        self.run.summary.update(summary)
        tables = {}
        if layer_rows:
            cols = list(layer_rows[0])
            tables["layers"] = wandb.Table(columns=cols, data=[[str(r[c]) if c == "shape" else r[c] for c in cols] for r in layer_rows])
        if fidelity_rows:
            cols = list(fidelity_rows[0])
            tables["fidelity_samples"] = wandb.Table(columns=cols, data=[[r[c] for c in cols] for r in fidelity_rows])
        if tables:
            self.run.log(tables)

    def finish(self, failed: bool = False) -> None:
        import wandb

        wandb.finish(exit_code=1 if failed else 0)


def make_tracker(cfg: dict[str, Any], config: dict[str, Any], run_dir: Path, job_name: str) -> NullTracker:
    if cfg.get("name", "none") == "none":
        return NullTracker()
    try:
        return WandbTracker(cfg, config, run_dir, job_name)
    except Exception as e:  # tracking must never cost the measurements
        log.warning("W&B could not start (%s: %s); continuing without tracking", type(e).__name__, e)
        return NullTracker()
