"""What one sweep job asks of a launcher, from the machine that launches the sweep: OmegaConf resolvers for the
launcher configs (conf/hydra/launcher/ray.yaml, submitit_local.yaml).

    ${codecllm.gpus:}          CUDA devices this process sees (0 without CUDA)
    ${codecllm.gpus_per_job:}  1 with CUDA, else 0: one GPU per job, and a CPU-only machine still schedules jobs
    ${codecllm.cpus_per_job:}  this process's cores divided among its GPUs (all of them without CUDA)

Why cores per GPU and not Ray's default of one: Ray sets OMP_NUM_THREADS to the task's num_cpus, so one CPU
would make torch and the CPU codecs single-threaded, and the timings would not match a sequential sweep's. On
a CPU-only machine the job gets every core, so one job runs at a time, as with Hydra's default launcher.

These describe the machine running `python -m harness`. A driver that joins a Ray cluster from a machine
without GPUs must say what a job needs (hydra.launcher.ray.remote.num_gpus=1 ...; docs/sweeps.md).
torch is imported only when a launcher config asks, and only device_count() is called: no CUDA context is
created in the process that launches the jobs.
"""

from __future__ import annotations

import os

from omegaconf import OmegaConf


def gpus() -> int:
    import torch

    return torch.cuda.device_count()  # honours CUDA_VISIBLE_DEVICES; 0 on a CPU-only build or machine


def gpus_per_job() -> int:
    return 1 if gpus() else 0


def cpus_per_job() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(cores // max(gpus(), 1), 1)


RESOLVERS = {"codecllm.gpus": gpus, "codecllm.gpus_per_job": gpus_per_job, "codecllm.cpus_per_job": cpus_per_job}


def register_resolvers() -> None:
    for name, fn in RESOLVERS.items():
        OmegaConf.register_new_resolver(name, fn, replace=True, use_cache=True)  # cached: asked once per config
