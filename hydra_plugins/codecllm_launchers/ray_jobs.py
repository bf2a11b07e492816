"""hydra/launcher=ray: hydra-ray-launcher's launcher for a local Ray or an existing cluster, waiting for every job.

This is the plugin's launch (hydra_plugins.hydra_ray_launcher._core.launch, 1.2.x) with three changes:
- jobs are collected as they end, with ray.wait, and one whose worker died is a failed job (died.py): the
  plugin's ray.get in job order raises at the first dead worker, the launching process exits, and Ray then
  stops every job still running or queued;
- no 75 MB object_store_memory default: ray.init refuses any object_store_memory when joining a cluster;
- hydra.sweep.dir is made absolute here, so a worker started in another directory (on a Ray node) writes into
  the sweep dir, and every job derives the same W&B group from it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, configure_log, filter_overrides, setup_globals
from omegaconf import open_dict

from hydra_plugins.codecllm_launchers.died import job_died

try:
    from hydra_plugins.hydra_ray_launcher.ray_launcher import RayLauncher as _PluginRayLauncher
except ImportError:  # no `engines` extra: hydra/launcher=ray is refused with the install command (harness/__main__)
    _PluginRayLauncher = None

log = logging.getLogger(__name__)

if _PluginRayLauncher is not None:

    class RayLauncher(_PluginRayLauncher):
        def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
            import ray  # here, not at the top: Hydra imports this module at every start-up
            from hydra_plugins.hydra_ray_launcher._launcher_util import launch_job_on_ray, start_ray

            assert self.config is not None and self.hydra_context is not None and self.task_function is not None
            setup_globals()
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
            sweep_dir = Path(str(self.config.hydra.sweep.dir)).absolute()
            sweep_dir.mkdir(parents=True, exist_ok=True)
            log.info(f"Ray Launcher is launching {len(job_overrides)} jobs, sweep output dir: {sweep_dir}")
            start_ray(self.ray_cfg.init)

            jobs = {}  # ObjectRef -> (position, the job's config)
            for pos, overrides in enumerate(job_overrides):
                idx = initial_job_idx + pos
                log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
                sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
                with open_dict(sweep_config):
                    sweep_config.hydra.sweep.dir = str(sweep_dir)
                    # On a scheduler this comes from the job's environment (SLURM_JOB_ID); Ray has none to give.
                    sweep_config.hydra.job.id = f"job_id_for_{idx}"
                    sweep_config.hydra.job.num = idx
                ref = launch_job_on_ray(
                    self.hydra_context, self.ray_cfg.remote, sweep_config, self.task_function, Singleton.get_state()
                )
                jobs[ref] = (pos, sweep_config)

            returns: list[JobReturn | None] = [None] * len(jobs)
            pending = list(jobs)
            while pending:
                (ref,), pending = ray.wait(pending, num_returns=1)
                pos, sweep_config = jobs[ref]
                try:
                    returns[pos] = ray.get(ref)
                except Exception as e:  # its worker died, its node was lost, it was cancelled or not unpickled
                    first_line = (str(e).strip().splitlines() or [""])[0]
                    returns[pos] = job_died(self.hydra_context, sweep_config, e, first_line)
            return returns
