"""The fused kernels compile with NVRTC and every kernel lut3_cuda launches is in the binary, with the register
budgets the builds promise (the *72 builds held to 72 with no spill). Needs NVRTC, not a GPU: skipped where
libnvrtc is not found (bench/kernel_build.py says how to get it on a CPU machine)."""

import importlib.util
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("kernel_build", ROOT / "bench" / "kernel_build.py")
kernel_build = importlib.util.module_from_spec(spec)
spec.loader.exec_module(kernel_build)


@pytest.fixture(scope="module")
def table():
    try:
        nvrtc = kernel_build.load_nvrtc(os.environ.get("CODECLLM_NVRTC_LIB"))
    except OSError:
        pytest.skip("needs libnvrtc (set CODECLLM_NVRTC_LIB to its folder)")
    from harness.fused import lut3_cuda

    rc, log = kernel_build.compile_source(nvrtc, lut3_cuda._SOURCE.read_text(), "90", [])
    assert rc == 0, log
    return kernel_build.resources(log)


def test_every_launched_kernel_is_built(table):
    from harness.fused import lut3_cuda

    assert [n for n in lut3_cuda._NAMES if n not in table] == []


def test_held_builds_keep_their_register_budget_without_spills(table):
    held = {n: r for n, r in table.items() if "72_m" in n}
    assert len(held) == 16  # gemv72, gemvb72, gemvc72, gemvcp72 at 1, 2, 4 and 8 tokens
    for name, r in held.items():
        assert r["registers"] <= 72 and r["spill_bytes"] == 0, (name, r)


def test_ptxas_report_is_parsed():
    log = (
        "ptxas info    : Compiling entry function 'k_m1' for 'sm_90'\n"
        "ptxas info    : Function properties for k_m1\n"
        "ptxas         .     16 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads\n"
        "ptxas info    : Used 64 registers, used 1 barriers\n"
    )
    assert kernel_build.resources(log) == {"k_m1": {"registers": 64, "stack_bytes": 16, "spill_bytes": 8}}


def test_wide_builds_do_not_spill(table):
    """The wide builds (9-32 tokens: a short prefill in one launch) keep their accumulators in registers: under
    __launch_bounds__(512) at most 128 registers, and no spill."""
    wide = {n: r for n, r in table.items() if n.rsplit("_m", 1)[-1] in ("16", "24", "32")}
    assert sorted(wide) == [f"lut3_{v}_m{m}" for v in ("gemv", "gemvb", "ref") for m in (16, 24, 32)]
    for name, r in wide.items():
        assert r["registers"] <= 128 and r["spill_bytes"] == 0 and r["stack_bytes"] == 0, (name, r)
