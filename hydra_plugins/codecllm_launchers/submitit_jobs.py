"""hydra/launcher=submitit_local and =slurm: hydra-submitit-launcher's launchers, waiting for every job.

This is the plugin's launch (BaseSubmititLauncher.launch, 1.2.x), except that jobs are collected as they end,
and one that submitit reports ended without a result (killed, out of memory, past its time limit, node failure,
cancelled) is a failed job (died.py). The plugin's job.results() in job order raises at the first such job: the
launching process exits while the others still run, and that job stays "running" in the report.
What runs in each job (BaseSubmititLauncher.__call__) is the plugin's.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, filter_overrides
from omegaconf import DictConfig, OmegaConf, open_dict

from hydra_plugins.codecllm_launchers.died import job_died

try:
    from hydra_plugins.hydra_submitit_launcher import submitit_launcher as _plugin
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
except ImportError:  # no `engines` extra: these launchers are refused with the install command (harness/__main__)
    _plugin = None

log = logging.getLogger(__name__)

POLL_S = 1.0  # how often the launching process asks whether a job has ended (submitit caches Slurm's answers)

if _plugin is not None:

    class _WaitsForEveryJob(_plugin.BaseSubmititLauncher):
        def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
            import submitit  # here, not at the top: Hydra imports this module at every start-up

            assert self.config is not None and self.hydra_context is not None
            assert len(job_overrides) > 0
            params = self.params
            specific_init_keys = {"max_num_timeout"}
            init_params = {"folder": params["submitit_folder"]}
            init_params.update({f"{self._EXECUTOR}_{k}": v for k, v in params.items() if k in specific_init_keys})
            executor = submitit.AutoExecutor(cluster=self._EXECUTOR, **init_params)
            base = set(OmegaConf.structured(BaseQueueConf).keys())
            init_keys = specific_init_keys | {"submitit_folder"}
            executor.update_parameters(
                **{k if k in base else f"{self._EXECUTOR}_{k}": v for k, v in params.items() if k not in init_keys}
            )

            log.info(f"Submitit '{self._EXECUTOR}' sweep output dir : {self.config.hydra.sweep.dir}")
            sweep_dir = Path(str(self.config.hydra.sweep.dir))
            sweep_dir.mkdir(parents=True, exist_ok=True)
            if "mode" in self.config.hydra.sweep:
                os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))

            job_params: list[Any] = []
            for pos, overrides in enumerate(job_overrides):
                idx = initial_job_idx + pos
                log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
                job_params.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()))
            jobs = executor.map_array(self, *zip(*job_params, strict=True))

            returns: list[JobReturn | None] = [None] * len(jobs)
            position = {id(job): pos for pos, job in enumerate(jobs)}
            for job in submitit.helpers.as_completed(jobs, poll_frequency=POLL_S):
                pos = position[id(job)]
                try:
                    returns[pos] = job.results()[0]
                except Exception as e:  # submitit's UncompletedJobError: the job ended without returning
                    config = self._job_config(job_overrides[pos], initial_job_idx + pos, str(job.job_id))
                    # "Job 42 (task: 0) with path ...\nhas not produced any output (state: OUT_OF_MEMORY)\nError
                    # stream produced: ..." (the job's stderr, in its log file): the reason is what comes before.
                    returns[pos] = job_died(self.hydra_context, config, e, str(e).split("Error stream produced")[0])
            return returns

        def __call__(self, *args: Any, **kwargs: Any) -> JobReturn:
            # In the job's process, which composes the job's config again: the same warning harness/__main__
            # silences in the launching process (conf/hydra/launcher/submitit_local.yaml takes the plugin's name).
            warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/\w+' is validated against ConfigStore schema")
            return super().__call__(*args, **kwargs)

        def _job_config(self, overrides: Sequence[str], idx: int, job_id: str) -> DictConfig:
            """The job's config as its own process composes it (BaseSubmititLauncher.__call__)."""
            assert self.config is not None and self.hydra_context is not None
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(sweep_config.hydra.job) as hydra_job:
                hydra_job.id = job_id
                hydra_job.num = idx
            return sweep_config

    class LocalLauncher(_WaitsForEveryJob, _plugin.LocalLauncher):
        pass

    class SlurmLauncher(_WaitsForEveryJob, _plugin.SlurmLauncher):
        pass
