"""Hydra composition of every option of every group (no model is loaded)."""

import pytest
import torch
from conftest import CONF, compose_config
from omegaconf import OmegaConf

from harness.errors import HarnessError
from harness.experiment import policy_options, validate

GROUPS = {g.name: sorted(p.stem for p in g.glob("*.yaml")) for g in CONF.iterdir() if g.is_dir()}


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_option_composes_and_validates(group, option):
    extra = {("model", "hf"): ["model.name_or_path=/some/model"], ("cache", "fused"): ["compress.codec=fused_lut3"]}
    cfg = compose_config(f"{group}={option}", *extra.get((group, option), []))
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    if group == "experiment" and cfg.device == "cuda" and not torch.cuda.is_available():
        with pytest.raises(HarnessError, match=r"is_available\(\) is False"):  # the GPU codec says why, up front
            validate(cfg)
        return
    validate(cfg)


def _leaves(node, prefix=""):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


@pytest.mark.parametrize("experiment", GROUPS["experiment"])
def test_experiment_overlay_wins(experiment):
    """Everything an experiment file sets reaches the composed config, read from the file rather than copied
    into this test: a file that lost `# @package _global_` (its values would land under `experiment.`) or a
    default composed after it would fail here."""
    overlay = OmegaConf.to_container(OmegaConf.load(CONF / "experiment" / f"{experiment}.yaml"))
    cfg = compose_config(f"experiment={experiment}")
    for entry in overlay.pop("defaults", []):  # `override /cache: per_forward_pass`: that option's whole group
        for key, option in entry.items():
            group = key.removeprefix("override /")
            assert cfg[group] == compose_config(f"{group}={option}")[group], (group, option)
    leaves = dict(_leaves(overlay))
    assert leaves, experiment
    for key, value in leaves.items():
        assert OmegaConf.select(cfg, key) == value, key


def test_policy_options_come_from_the_cache_group():
    assert policy_options(compose_config("cache=lru", "cache.budget_mb=5")) == {"budget_mb": 5}
    assert policy_options(compose_config("cache=prefetch")) == {"depth": 2, "workers": 1}
    assert policy_options(compose_config("cache=none")) == {}
