"""conf/hydra/launcher/{ray,submitit_local,slurm}.yaml as Hydra composes them: resources per job from this machine,
Slurm's partition/account/time limit from the environment, our launchers as targets; and a launcher whose plugin
is not installed refused in one line. The engines themselves run in tests/test_engines.py."""

from __future__ import annotations

import os
import warnings

from conftest import RunIf, compose_config
from omegaconf import OmegaConf

from harness.__main__ import LAUNCHER_PLUGINS, missing_launcher_plugin
from harness.job_resources import gpus, gpus_per_job, register_resolvers


def launcher(name: str) -> dict:
    register_resolvers()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/\w+' is validated against ConfigStore schema")
        cfg = compose_config(f"hydra/launcher={name}", return_hydra_config=True)
    return OmegaConf.to_container(cfg.hydra.launcher, resolve=True)


@RunIf(packages=["hydra_plugins.hydra_ray_launcher"])
def test_ray_launcher_config(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ray = launcher("ray")
    assert ray["_target_"] == "hydra_plugins.codecllm_launchers.ray_jobs.RayLauncher"
    assert ray["ray"]["init"]["address"] == "local"  # a Ray of its own for the sweep, whatever else runs here
    # One GPU per job on a CUDA machine, else none; the cores shared among the GPUs, or all of them on a CPU-only
    # machine: one job at a time there, with as many threads as a sequential sweep's (Ray sets OMP_NUM_THREADS).
    cores = len(os.sched_getaffinity(0))
    resources = {"num_gpus": 1, "num_cpus": max(cores // gpus(), 1)} if gpus() else {"num_gpus": 0, "num_cpus": cores}
    assert ray["ray"]["remote"] == {**resources, "max_calls": 1, "max_retries": 0}
    assert "object_store_memory" not in ray["ray"]["init"]  # ray.init refuses it when joining a cluster
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    assert launcher("ray")["ray"]["init"]["address"] == "ray://head:10001"


@RunIf(packages=["hydra_plugins.hydra_submitit_launcher"])
def test_submitit_launcher_configs(monkeypatch):
    local = launcher("submitit_local")
    assert local["_target_"] == "hydra_plugins.codecllm_launchers.submitit_jobs.LocalLauncher"
    assert local["gpus_per_node"] == gpus_per_job()  # the plugin's default (none) would hide every GPU

    for var in ("SBATCH_PARTITION", "SBATCH_ACCOUNT", "CODECLLM_SLURM_TIMEOUT_MIN"):
        monkeypatch.delenv(var, raising=False)
    slurm = launcher("slurm")
    assert slurm["_target_"] == "hydra_plugins.codecllm_launchers.submitit_jobs.SlurmLauncher"
    assert (slurm["partition"], slurm["account"], slurm["timeout_min"]) == (None, None, 120)
    assert (slurm["nodes"], slurm["tasks_per_node"], slurm["gpus_per_node"]) == (1, 1, 1)  # one GPU per job
    monkeypatch.setenv("SBATCH_PARTITION", "gpu")
    monkeypatch.setenv("SBATCH_ACCOUNT", "proj")
    monkeypatch.setenv("CODECLLM_SLURM_TIMEOUT_MIN", "30")
    slurm = launcher("slurm")
    assert (slurm["partition"], slurm["account"], slurm["timeout_min"]) == ("gpu", "proj", 30)


def test_launcher_without_its_plugin_is_refused_in_one_line():
    absent = {"ray": ("hydra-ray-launcher", "hydra_plugins.no_such_launcher")}
    message = missing_launcher_plugin(["-m", "hydra/launcher=ray", "cache=none"], absent)
    assert message == 'hydra/launcher=ray needs hydra-ray-launcher; install it with: pip install -e ".[engines]"'
    assert missing_launcher_plugin(["-m", "hydra/launcher=joblib_gpu"], absent) is None  # not one of them
    installed = {name: (pkg, "harness") for name, (pkg, _) in LAUNCHER_PLUGINS.items()}
    assert missing_launcher_plugin(["-m", "hydra/launcher=slurm"], installed) is None
