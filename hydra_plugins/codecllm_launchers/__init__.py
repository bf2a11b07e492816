"""The harness's Hydra launchers for sweeps on real engines: hydra-ray-launcher's and hydra-submitit-launcher's,
waiting for every job (conf/hydra/launcher/{ray,submitit_local,slurm}.yaml; docs/sweeps.md).

Why here and not in `harness`: Hydra only instantiates launchers defined under the `hydra_plugins` namespace,
and finds them by importing every module in it at start-up. So these modules import nothing heavy (ray,
submitit) until a sweep runs, and define nothing when the plugin they extend is not installed (without the
`engines` extra), instead of failing Hydra's scan.

The plugins wait for their jobs one after the other and raise at the first job whose worker died, so the
launching process exits early (under Ray that stops every job still running or queued) and the dead job never
reaches the report. These wait for every job, and report a job that died like any failed job (died.py).
"""
