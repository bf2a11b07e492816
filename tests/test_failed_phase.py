"""No lost results: a failure in the compressed phase (out of memory, a corrupted payload) still writes
results.json with the baseline phase's numbers and prints the summary."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_run_config

import harness.experiment as experiment
from harness.errors import IntegrityError


def oom_in_compressed_phase(monkeypatch):
    real = experiment.run_phase

    def run_phase(name, *args, **kwargs):
        if name == "compressed":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(experiment, "run_phase", run_phase)
    return torch.OutOfMemoryError, "OutOfMemoryError: CUDA out of memory"


def corrupt_payload_after_compression(monkeypatch):
    real = experiment.compress_cached

    def compress_cached(*args, **kwargs):
        runtime = real(*args, **kwargs)
        runtime.layers[2].ct.payload[-1] ^= 0x01
        return runtime

    monkeypatch.setattr(experiment, "compress_cached", compress_cached)
    # the last byte is in a raw (sign/mantissa) frame: its own xxh3 catches it before the weight's checksum
    return IntegrityError, "layer model.layers.0.self_attn.v_proj: cannot decompress its weight (raw frame"


@pytest.mark.parametrize("fault", [oom_in_compressed_phase, corrupt_payload_after_compression])
def test_failure_in_the_compressed_phase_keeps_the_baseline(tmp_path, monkeypatch, fault, capsys):
    error_type, message = fault(monkeypatch)
    with pytest.raises(error_type):
        experiment.run(tiny_run_config(tmp_path, "compress.layers=all"), tmp_path / "run", ["model=tiny"])
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["status"] == "failed" and message in res["error"]
    assert res["baseline"]["forward_passes"] == 2 and res["baseline"]["output_token_ids"]
    assert "comparison" not in res
    assert "FAILED" in capsys.readouterr().out  # the summary still prints, with the baseline
