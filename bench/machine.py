"""The machine a benchmark ran on, recorded with its figures: card, driver and package versions, CPU.

A figure without its machine cannot be compared or repeated; the GPU benchmarks print this first and write it
as the first JSON line of their output.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess

PACKAGES = ("torch", "transformers", "nvidia-nvcomp-cu13", "nvidia-libnvcomp-cu13", "zstandard")


def _nvidia_smi(query: str) -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.strip().splitlines()
    return lines[0].strip() if out.returncode == 0 and lines else None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def describe() -> dict:
    import torch

    versions = {}
    for dist in PACKAGES:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    cuda = torch.cuda.is_available()
    return {
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "driver": _nvidia_smi("driver_version"),
        "cuda_runtime": torch.version.cuda,
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "packages": versions,
    }


def line(info: dict) -> str:
    pkgs = ", ".join(f"{k} {v}" for k, v in info["packages"].items() if v)
    return (f"{info['gpu'] or 'no GPU'} (x{info['gpu_count']}), driver {info['driver'] or 'unknown'}, "
            f"CUDA {info['cuda_runtime']}, {info['cpu_count']} x {info['cpu']}, Python {info['python']}; {pkgs}")
