"""Experiment tracking: W&B through Lightning's WandbLogger (offline unless asked), or nothing.

wandb is imported only when logger=wandb. A W&B failure (online without credentials, say) becomes a warning:
the run goes on and its results.json is complete.

Sweeps (Hydra multirun): every job of one sweep joins one W&B `group` (default: named after the sweep dir,
`sweep-<date>-<time>`), with job_type "sweep", one tag per task override ("cache=none",
"compress.layers=20") and the swept overrides as the run name. logger.group / logger.job_type / logger.tags
set in the config win (tags are added to). The W&B config gets, besides the nested resolved config, flat
scalar keys to group and filter by (FLAT_KEYS) -- see docs/sweeps.md. Single runs keep the logger config as is.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Flat, top-level keys added to every W&B run's config. Nested keys already show in W&B as `compress.layers`,
# `cache.name`, ... (W&B reads a dot as nesting), so the flat ones must not reuse a top-level name of the
# config (`model`, `cache` are dicts there): hence `model_name`, `cache_policy`.
FLAT_KEYS = ("model_name", "codec", "cache_policy", "layers")

# results.json's sections whose numbers the W&B summary holds, flattened with "/" (as harness.schema's paths are).
MEASURED_SECTIONS = ("baseline", "compressed", "comparison", "rounds")

SWEEP_JOB_TYPE = "sweep"
TAG_MAX = 64  # W&B rejects longer tags
NAME_MAX = 128


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, f"{key}/"))
        elif isinstance(v, (int, float, bool)) and not isinstance(v, type(None)):
            out[key] = v
    return out


def wandb_summary(results: dict[str, Any]) -> dict[str, Any]:
    """Every number of results.json's measured sections, keyed by its path: the schema's paths
    (harness.schema.FIELDS: `compressed/tokens_per_s`, `comparison/speed_ratio`, ...), plus the numbers it does
    not detail (`rounds/<side>/time_s_q1`, ...), the status and the fidelity verdict per task."""
    sections = {k: results[k] for k in MEASURED_SECTIONS if isinstance(results.get(k), dict)}
    summary = _flat(sections)
    summary["status"] = results.get("status")
    if results.get("fidelity"):
        summary["fidelity/verdict"] = results["fidelity"]["verdict"]
        for task, t in results["fidelity"]["tasks"].items():
            summary[f"fidelity/{task}/max_abs_loglikelihood_diff"] = t["max_abs_loglikelihood_diff"]
            summary[f"fidelity/{task}/samples_differing"] = t["samples_differing"]
    return summary


def flat_config(config: dict[str, Any]) -> dict[str, Any]:
    """The FLAT_KEYS of a resolved run config: what a sweep varies, as scalars W&B can group by."""

    def get(*keys: str) -> Any:
        d: Any = config
        for k in keys:
            d = d.get(k) if isinstance(d, dict) else None
        return d

    return {
        "model_name": get("model", "name"),
        "codec": get("compress", "codec"),
        "cache_policy": get("cache", "name"),
        "layers": get("compress", "layers"),
    }


@dataclass
class SweepInfo:
    """Where a multirun job sits: its sweep dir, its job number, and the overrides the sweep varies."""

    sweep_dir: Path
    job_num: int | None = None
    swept_keys: list[str] = field(default_factory=list)  # empty: unknown, every override counts as swept

    @property
    def group(self) -> str:
        return sweep_group(self.sweep_dir)


def sweep_group(sweep_dir: str | Path) -> str:
    """W&B group of a sweep, from its dir: `sweep-2025-01-01-12-00-00` for Hydra's default
    outputs/multirun/<date>/<time>; for another dir its name plus a short hash of the absolute path, so two
    sweep dirs that share a name do not share a group."""
    p = Path(sweep_dir).absolute()
    parts = p.parts[-2:]
    if len(parts) == 2 and _is_date(parts[0]) and _is_time(parts[1]):
        return f"sweep-{parts[0]}-{parts[1]}"
    digest = hashlib.sha1(str(p).encode()).hexdigest()[:6]
    return f"sweep-{p.name[: NAME_MAX - 20]}-{digest}"


def _is_date(s: str) -> bool:
    return len(s) == 10 and s[4] == s[7] == "-" and s.replace("-", "").isdigit()


def _is_time(s: str) -> bool:
    return len(s) == 8 and s[2] == s[5] == "-" and s.replace("-", "").isdigit()


def hydra_sweep_info() -> SweepInfo | None:
    """SweepInfo of the running Hydra job when it is part of a multirun, else None (single run, or no Hydra)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized():
            return None
        hc = HydraConfig.get()
        if hc.mode != RunMode.MULTIRUN:
            return None
        from harness.sweep_callback import sweep_dir_of

        sweep_dir = sweep_dir_of(hc.runtime.output_dir, hc.sweep.subdir)
        num = hc.job.get("num")
        return SweepInfo(sweep_dir, int(num) if num is not None else None, _swept_keys(sweep_dir))
    except Exception as e:  # never fail a job over naming its W&B run
        log.debug("no sweep info from Hydra: %s", e)
        return None


def _swept_keys(sweep_dir: Path) -> list[str]:
    """Override keys with several values in the sweep (`compress.layers=0,20`), read from the multirun.yaml
    Hydra writes into the sweep dir before the first job; [] when it cannot be read."""
    try:
        from hydra.core.override_parser.overrides_parser import OverridesParser
        from omegaconf import OmegaConf

        overrides = OmegaConf.load(sweep_dir / "multirun.yaml").hydra.overrides.task
        parsed = OverridesParser.create().parse_overrides([str(o) for o in overrides])
        return [o.get_key_element() for o in parsed if o.is_sweep_override()]
    except Exception:
        return []


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def run_identity(cfg: dict[str, Any], overrides: list[str], sweep: SweepInfo | None, job_name: str) -> dict[str, Any]:
    """name/group/job_type/tags for wandb.init. Single run: the logger config as is (name: the Hydra job name).
    Sweep job: group from the sweep dir, job_type "sweep", a tag per override, named after the swept overrides."""
    tags = [str(t) for t in (cfg.get("tags") or [])]
    ident = {"name": job_name, "group": cfg.get("group"), "job_type": cfg.get("job_type"), "tags": tags}
    if sweep is None:
        return ident
    overrides = [str(o) for o in overrides]
    swept = [o for o in overrides if _key(o) in sweep.swept_keys] or overrides
    name = " ".join(swept) or job_name
    if sweep.job_num is not None:
        name = f"{sweep.job_num}: {name}"
    for o in overrides:
        tag = o[:TAG_MAX]
        if tag and tag not in tags and not _key(o).startswith(("logger", "hydra")):  # the same in every W&B run
            tags.append(tag)
    ident.update(
        name=name[:NAME_MAX],
        group=cfg.get("group") or sweep.group,
        job_type=cfg.get("job_type") or SWEEP_JOB_TYPE,
        tags=tags,
    )
    return ident


def rounds_table(rounds: dict[str, Any] | None) -> list[dict[str, Any]]:
    """One row per paired round: its order, each side's time and the round's speed ratio."""
    if not rounds or not rounds.get("speed_ratio_per_round"):
        return []
    return [
        {"round": i + 1, "order": " → ".join(order), "baseline_time_s": rounds["baseline"]["times_s"][i],
         "compressed_time_s": rounds["compressed"]["times_s"][i], "speed_ratio": ratio}
        for i, (order, ratio) in enumerate(zip(rounds["orders"], rounds["speed_ratio_per_round"], strict=True))
    ]


class NullTracker:
    """logger=none: touches no W&B."""

    lightning_logger: Any = False
    sync_command: str | None = None

    def log_results(self, results: dict[str, Any], layer_rows: list[dict], fidelity_rows: list[dict] | None) -> None:
        pass

    def finish(self, failed: bool = False) -> None:
        pass


class WandbTracker(NullTracker):
    def __init__(self, cfg: dict[str, Any], config: dict[str, Any], run_dir: Path, ident: dict[str, Any]) -> None:
        from lightning.pytorch.loggers import WandbLogger

        mode = cfg.get("mode", "offline")
        self.lightning_logger = WandbLogger(
            project=cfg.get("project", "codecllm"),
            entity=cfg.get("entity"),
            name=ident["name"],
            save_dir=str(run_dir),
            offline=mode == "offline",
            mode=mode,
            group=ident["group"],
            job_type=ident["job_type"],
            tags=ident["tags"],
            config={**config, **flat_config(config)},
        )
        self.run = self.lightning_logger.experiment  # starts the run now, so its files exist from the start
        self.sync_command = f"wandb sync {Path(self.run.dir).parent}" if mode == "offline" else None

    def log_results(self, results, layer_rows, fidelity_rows):
        import wandb

        summary = wandb_summary(results)
        self.run.summary.update(summary)
        tables = {}
        if layer_rows:
            cols = list(layer_rows[0])
            tables["layers"] = wandb.Table(columns=cols, data=[[str(r[c]) if c == "shape" else r[c] for c in cols] for r in layer_rows])
        round_rows = rounds_table(results.get("rounds"))
        if round_rows:
            cols = list(round_rows[0])
            tables["rounds"] = wandb.Table(columns=cols, data=[[r[c] for c in cols] for r in round_rows])
        if fidelity_rows:
            cols = list(fidelity_rows[0])
            tables["fidelity_samples"] = wandb.Table(columns=cols, data=[[r[c] for c in cols] for r in fidelity_rows])
        if tables:
            self.run.log(tables)

    def finish(self, failed: bool = False) -> None:
        import wandb

        wandb.finish(exit_code=1 if failed else 0)


def make_tracker(
    cfg: dict[str, Any],
    config: dict[str, Any],
    run_dir: Path,
    job_name: str,
    overrides: list[str] | None = None,
    sweep: SweepInfo | None | bool = True,
) -> NullTracker:
    """The job's tracker. `cfg` is the logger section of `config`; `sweep=True` asks Hydra whether this job is
    part of a multirun (False/None: a single run). For a W&B run, the group/job_type/tags it got are written
    back into `cfg`, so results.json's config.logger records them."""
    if cfg.get("name", "none") == "none":
        return NullTracker()
    if sweep is True:
        sweep = hydra_sweep_info()
    try:
        ident = run_identity(cfg, list(overrides or []), sweep or None, job_name)
        tracker = WandbTracker(cfg, config, run_dir, ident)
    except Exception as e:  # tracking must never cost the measurements
        log.warning("W&B could not start (%s: %s); continuing without tracking", type(e).__name__, e)
        return NullTracker()
    cfg.update(group=ident["group"], job_type=ident["job_type"], tags=ident["tags"])
    return tracker
