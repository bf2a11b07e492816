"""Hydra callbacks for sweeps: a report that stays current while the sweep runs, and one GPU per parallel job.

Wire them in the primary config (docs/sweeps.md):

    hydra:
      callbacks:
        sweep_report:
          _target_: harness.sweep_callback.SweepReport
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from harness.atomic import write_atomic

try:
    import fcntl
except ImportError:  # Windows: GPUs are picked from the job number alone.
    fcntl = None

log = logging.getLogger(__name__)


class SweepReport(Callback):
    """Rebuild <sweep dir>/{comparison.csv,comparison.md,*.png,dashboard.html} after every job.

    Rows are re-collected from the job dirs on disk rather than kept in memory: with the joblib launcher each
    job ends in a different worker process, and Hydra skips on_multirun_end once a job has failed, so the
    files on disk are the only state every job end can see. A report written after each job also survives a
    sweep that is interrupted midway.
    """

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        try:
            mode = OmegaConf.select(config, "hydra.mode")
            if getattr(mode, "name", mode) != RunMode.MULTIRUN.name:  # the enum, or its name in a plain config
                return
            job_dir = Path(str(config.hydra.runtime.output_dir))
            if job_return.status == JobStatus.FAILED:
                record_failure(job_dir, list(job_return.overrides or []), _one_line(job_return._return_value))
            _write_report(sweep_dir_of(job_dir, config.hydra.sweep.subdir))
        except Exception as e:  # the report must never take the sweep down with it
            log.warning("sweep report not written after job: %s", _one_line(e))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            _write_report(Path(str(config.hydra.sweep.dir)))
        except Exception as e:
            log.warning("sweep report not written at the end of the sweep: %s", _one_line(e))


def record_failure(job_dir: Path, overrides: list[str], error: str) -> None:
    """Make the job's results.json say why it failed, so rebuilding the report later shows the exception.

    Writes a minimal results.json (status, error, overrides) when the job died before writing one (making its
    dir if it never started); marks an
    existing one failed when it still says "running"/"completed"; leaves one that already says "failed" as is.
    """
    path = job_dir / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)  # a job that died before it started (cancelled while queued)
    results: dict[str, Any] = {}
    if path.exists():
        try:
            results = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            results = {}  # half-written by the crashed job: keep what we know instead
        if results.get("status") == "failed":
            return
    results.update(status="failed", error=error)
    results.setdefault("overrides", overrides)
    write_atomic(path, json.dumps(results, indent=2))


def _write_report(sweep_dir: Path) -> None:
    from harness.report import write_report  # late: matplotlib is only needed once a job has ended

    paths = write_report(sweep_dir)
    log.info("sweep report: %s", paths["html"])


def sweep_dir_of(job_dir: Path | str, subdir: str) -> Path:
    """The job dir minus hydra.sweep.subdir, not hydra.sweep.dir: exact even where hydra.sweep.dir holds
    ${now:...} and the job runs in another process (joblib, submitit) than the one that created the sweep dir."""
    job_dir = Path(str(job_dir))
    for _ in Path(str(subdir)).parts:
        job_dir = job_dir.parent
    return job_dir


def _one_line(e: BaseException | Any) -> str:
    text = f"{type(e).__name__}: {e}" if isinstance(e, BaseException) else str(e)
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return first[:500]


# ---------------------------------------------------------------------------------------------------------
# One GPU per job


class GpuPerJob(Callback):
    """Before each job, restrict it to one GPU with assign_gpu (see there). `n_gpus: null` turns it off."""

    def __init__(self, n_gpus: int | None = None, lock_dir: str | None = None) -> None:
        self.n_gpus = n_gpus
        self.lock_dir = lock_dir

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            num = OmegaConf.select(config, "hydra.job.num", default=0)
            gpu = assign_gpu(int(num or 0), self.n_gpus, self.lock_dir)
            if gpu is not None:
                log.info("job %s: CUDA_VISIBLE_DEVICES=%s", num, gpu)
        except Exception as e:
            log.warning("no GPU assigned to the job: %s", _one_line(e))


# The GPU this process is pinned to, and the open lock file that claims it for the life of the process.
_pinned: tuple[str, Any] | None = None


def assign_gpu(job_num: int, n_gpus: int | None, lock_dir: str | Path | None = None) -> str | None:
    """Set CUDA_VISIBLE_DEVICES to one GPU for this job and return it; None (env untouched) when n_gpus is None/0.

    Must run before CUDA is initialised in the process (torch may be imported; nothing may touch the GPU).
    The job prefers GPU `job_num % n_gpus`. GPU indices map through an existing CUDA_VISIBLE_DEVICES list,
    so "4,5,6,7" with n_gpus=4 spreads jobs over 4..7.

    Why locks and pinning: joblib's loky workers are reused, so a worker that ran job 0 on GPU 0 may next
    get job 3 -- its CUDA context is already on GPU 0 and cannot move. So the first call in a process pins
    the process to a GPU for good (later calls return it), and claims it with an flock under `lock_dir`, so
    concurrently running workers on one host never share a GPU while n_jobs <= n_gpus. Locks vanish when a
    process exits. With more workers than GPUs, the job falls back to sharing its preferred GPU.
    """
    global _pinned
    if not n_gpus:
        return None
    if _pinned is not None:
        return _pinned[0]
    parent = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = [d.strip() for d in parent.split(",") if d.strip()] if parent else [str(i) for i in range(n_gpus)]
    if len(devices) < n_gpus:
        raise ValueError(f"n_gpus={n_gpus} but CUDA_VISIBLE_DEVICES={parent!r} lists only {len(devices)} devices")
    order = [(job_num + i) % n_gpus for i in range(n_gpus)]  # preferred GPU first, then the next free one
    lock = None
    if fcntl is not None:
        locks = Path(lock_dir) if lock_dir else Path(tempfile.gettempdir()) / "codecllm-gpu-locks"
        locks.mkdir(parents=True, exist_ok=True)
        for i in order:
            f = open(locks / f"gpu-{devices[i]}.lock", "a")  # stays open: closing it releases the lock
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                continue
            order, lock = [i], f
            break
        else:
            log.warning("all %d GPUs are held by other jobs; job %d shares GPU %s", n_gpus, job_num, devices[order[0]])
    gpu = devices[order[0]]
    os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    _pinned = (gpu, lock)
    return gpu
