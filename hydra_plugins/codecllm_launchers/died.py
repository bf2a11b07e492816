"""A job whose process never returned (killed, out of memory, past its time limit, node lost, cancelled), turned
into a failed job like one that raised."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import HydraContext
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

log = logging.getLogger(__name__)


class JobDied(RuntimeError):
    """The job's process ended without returning; the engine's own error is the cause."""


def job_died(hydra_context: HydraContext, sweep_config: DictConfig, error: BaseException, reason: str) -> JobReturn:
    """A failed JobReturn for the job of `sweep_config`, after running its on_job_end callbacks here.

    The job's own process never got to on_job_end, so the launching process runs it on the job's behalf: the
    SweepReport callback then writes `reason` (one line: the engine's error type and what it says) into the
    job's results.json and rebuilds the report, and the job is a red row instead of one stuck at "running".
    Hydra raises the error once every job has ended.
    """
    died = JobDied(" ".join(f"{type(error).__name__}: {reason}".split()))
    died.__cause__ = error
    orig = HydraConfig.instance().cfg
    HydraConfig.instance().set_config(sweep_config)  # as run_job does, so that ${hydra:...} in the subdir resolves
    try:
        job_dir = Path(str(sweep_config.hydra.sweep.dir)) / str(sweep_config.hydra.sweep.subdir)
        with read_write(sweep_config.hydra.runtime), open_dict(sweep_config.hydra.runtime):
            sweep_config.hydra.runtime.output_dir = os.path.abspath(job_dir)
        overrides = [str(o) for o in OmegaConf.to_container(sweep_config.hydra.overrides.task)]
        log.error("job %s (%s) died: %s", sweep_config.hydra.job.num, " ".join(overrides), died)
        ret = JobReturn(overrides=overrides, cfg=sweep_config, hydra_cfg=sweep_config, working_dir=os.getcwd(),
                        task_name=str(sweep_config.hydra.job.name), status=JobStatus.FAILED, _return_value=died)
        hydra_context.callbacks.on_job_end(config=sweep_config, job_return=ret)
    finally:
        HydraConfig.instance().cfg = orig
    return ret
