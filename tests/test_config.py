"""Hydra composition of every option of every group (no model is loaded)."""

import inspect

import hydra
import pytest
import torch
from conftest import CONF, compose_config
from omegaconf import OmegaConf

from harness.checks import validate
from harness.codecs import CODECS
from harness.components import build_codec, policy_factory
from harness.errors import HarnessError
from harness.runtime.policy import make_policy

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


def test_the_cache_group_is_a_partial_of_the_policy():
    """`cache=lru cache.budget_mb=5` reaches the policy as make_policy's name and options, nothing else."""
    for overrides, keywords in [(["cache=lru", "cache.budget_mb=5"], {"name": "lru", "budget_mb": 5}),
                                (["cache=prefetch"], {"name": "prefetch", "depth": 2, "workers": 1}),
                                (["cache=none"], {"name": "none"})]:
        factory = policy_factory(compose_config(*overrides).cache)
        assert factory.func is make_policy and factory.keywords == keywords, overrides


def test_every_codec_has_an_entry_holding_only_its_own_options():
    """compress.codec=NAME works for every registered codec, and no entry hands a constructor an option it would
    have to accept only to ignore (GPU codecs and level/threads)."""
    codecs = compose_config().compress.codecs
    assert sorted(codecs) == CODECS.names()
    for name, entry in codecs.items():
        cls = hydra.utils.get_class(entry._target_)
        assert cls is CODECS.get(name), name
        options = set(entry) - {"_target_"}
        assert options <= set(inspect.signature(cls.__init__).parameters) - {"self"}, name


def test_compress_level_reaches_the_codec():
    codec = build_codec(compose_config("compress.codec=zstd", "compress.level=1", "compress.threads=2").compress)
    assert codec.name == "zstd" and codec.settings()["level"] == 1 and codec.threads == 2
