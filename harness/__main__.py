"""`python -m harness [overrides]`: the Hydra entry point. Kept short: all work is in harness.experiment."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import difflib  # noqa: E402
import logging  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.core.override_parser.overrides_parser import OverridesParser  # noqa: E402
from hydra.core.override_parser.types import ValueType  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from harness.errors import HarnessError  # noqa: E402
from harness.job_resources import register_resolvers  # noqa: E402

register_resolvers()  # ${codecllm.gpus_per_job:} ... in conf/hydra/launcher/*.yaml
# conf/hydra/launcher/{ray,submitit_local}.yaml take the names of the plugins' own configs, so Hydra checks them
# against those schemas and warns that it will stop doing so. They are complete without the schema either way.
warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/\w+' is validated against ConfigStore schema")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from harness.experiment import run

    # Lightning's accelerator banners arrive twice through Hydra's root logger; keep its warnings only.
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    hc = HydraConfig.get()
    try:
        run(cfg, Path(hc.runtime.output_dir), list(hc.overrides.task), job_name=hc.job.name)
    except HarnessError as e:
        if hc.mode == RunMode.MULTIRUN or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise  # Hydra records the failed job and runs the others
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)


CONF = Path(__file__).resolve().parent / "conf"  # a link to the top-level conf/ (copied into wheels)
OTHER_CONFIG_SOURCES = ("-cp", "--config-path", "-cd", "--config-dir", "-cn", "--config-name", "--experimental-rerun")


def unknown_group_option(args: list[str]) -> str | None:
    """Hydra reports an unknown group option (cache=lru2) over several lines: say it in one, as for every other
    bad input. Anything this does not understand (glob or range sweeps, another config source, a syntax error)
    is left to Hydra."""
    if any(a.split("=")[0] in OTHER_CONFIG_SOURCES or a.startswith("hydra.searchpath") for a in args):
        return None
    try:
        overrides = OverridesParser.create().parse_overrides([a for a in args if "=" in a and not a.startswith("-")])
    except Exception:
        return None
    for o in overrides:
        group = CONF / o.key_or_group
        if o.key_or_group.startswith("hydra") or o.is_delete() or not group.is_dir():
            continue
        if o.value_type == ValueType.ELEMENT:
            values = [o.value()]
        elif o.value_type in (ValueType.CHOICE_SWEEP, ValueType.SIMPLE_CHOICE_SWEEP):
            values = list(o.sweep_string_iterator())
        else:
            continue
        options = sorted(p.relative_to(group).with_suffix("").as_posix() for p in group.rglob("*.yaml"))
        for value in values:
            if value is None or str(value) in (*options, "null"):
                continue
            close = difflib.get_close_matches(str(value), options, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            return f"unknown {o.key_or_group} option {str(value)!r}; valid: {', '.join(options)}.{hint}"
    return None


# The launcher configs that need a plugin outside the base install, and the module that plugin provides.
LAUNCHER_PLUGINS = {
    "ray": ("hydra-ray-launcher", "hydra_plugins.hydra_ray_launcher"),
    "submitit_local": ("hydra-submitit-launcher", "hydra_plugins.hydra_submitit_launcher"),
    "slurm": ("hydra-submitit-launcher", "hydra_plugins.hydra_submitit_launcher"),
}


def missing_launcher_plugin(args: list[str], plugins: dict[str, tuple[str, str]] = LAUNCHER_PLUGINS) -> str | None:
    """hydra/launcher=ray without the `engines` extra: Hydra would say "Unknown plugin class" over several lines;
    say which package is missing and how to install it."""
    import importlib.util

    for a in args:
        key, _, value = a.partition("=")
        if key.lstrip("+") != "hydra/launcher" or value not in plugins:
            continue
        package, module = plugins[value]
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            return f"hydra/launcher={value} needs {package}; install it with: pip install -e \".[engines]\""
    return None


if __name__ == "__main__":
    if (message := unknown_group_option(sys.argv[1:]) or missing_launcher_plugin(sys.argv[1:])) is not None:
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    main()
