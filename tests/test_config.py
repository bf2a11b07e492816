"""Hydra composition of every option of every group (no model is loaded)."""

import pytest
import torch
from conftest import CONF
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from harness.errors import HarnessError
from harness.experiment import policy_options, validate

GROUPS = {g.name: sorted(p.stem for p in g.glob("*.yaml")) for g in CONF.iterdir() if g.is_dir()}


def compose_with(overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_option_composes_and_validates(group, option):
    extra = {("model", "hf"): ["model.name_or_path=/some/model"], ("cache", "fused"): ["compress.codec=fused_lut3"]}
    cfg = compose_with([f"{group}={option}", *extra.get((group, option), [])])
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    if group == "experiment" and cfg.device == "cuda" and not torch.cuda.is_available():
        with pytest.raises(HarnessError, match=r"is_available\(\) is False"):  # the GPU codec says why, up front
            validate(cfg)
        return
    validate(cfg)


def test_prototype_experiment_overlay():
    cfg = compose_with(["experiment=prototype"])
    assert cfg.compress.layers == 20 and cfg.compress.codec == "zstd" and cfg.cache.name == "per_forward_pass"


def test_policy_options_come_from_the_cache_group():
    assert policy_options(compose_with(["cache=lru", "cache.budget_mb=5"])) == {"budget_mb": 5}
    assert policy_options(compose_with(["cache=prefetch"])) == {"depth": 2, "workers": 1}
    assert policy_options(compose_with(["cache=none"])) == {}
