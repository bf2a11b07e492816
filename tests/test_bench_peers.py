"""bench/bench_peers.py on the CPU (its smoke test): GPU arms become skipped rows with their reason, an arm that
fails to build or fails mid-rounds becomes an error row with its traceback, and the others still get their figures.

A CPU-decodable arm (zstd + cache=block) and two broken arms are planted in the script's arm table, so the
compressed-arm path (build, phase, paired rounds, exactness, memory) runs without a GPU.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_peers.py"


@pytest.fixture(scope="module")
def bp():
    spec = importlib.util.spec_from_file_location("bench_peers", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_peers"] = module  # its dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_peers", None)


def test_smoke_on_cpu(bp, tmp_path, monkeypatch):
    def broken_build(ctx):
        raise RuntimeError("planted build failure")

    def broken_later(ctx):
        """A dense copy whose forward fails from its second generation on: its phase passes, its rounds do not."""
        model = bp.fresh_copy(ctx.dense.model)
        calls = [0]

        def hook(*_):
            calls[0] += 1
            if calls[0] > 2:  # 2 tokens: the first generation's 2 forward passes
                raise RuntimeError("planted failure in the rounds")

        model.register_forward_pre_hook(hook)
        return bp.Built(model, info={"ratio": 1.0})

    zstd_block = bp.Arm("zstd + block (test)", "eager", lambda c: bp.build_ours(c, codec="zstd", placement="cpu"))
    monkeypatch.setitem(bp.ARMS, "zstd_block", zstd_block)
    monkeypatch.setitem(bp.ARMS, "broken_build", bp.Arm("broken build (test)", "eager", broken_build))
    monkeypatch.setitem(bp.ARMS, "broken_later", bp.Arm("broken later (test)", "eager", broken_later))
    out = tmp_path / "peers.jsonl"
    arms = ["ours", "df11", "zstd_block", "broken_build", "broken_later", "ours_cpu", "df11_compiled"]
    bp.main(["--device", "cpu", "--tiny", "--batch", "1", "2", "--tokens", "2", "--rounds", "2", "--out", str(out)]
            + ["--arms", *arms])  # fmt: skip

    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines[0]["event"] == "machine" and lines[0]["machine"]["cpu_count"] >= 1
    rows = [r for r in lines if r["event"] == "row"]
    by = {(r["arm"], r["batch"]): r for r in rows}
    for arm in ("ours", "df11", "ours_cpu"):
        assert by[(arm, None)]["status"] == "skipped" and "CUDA" in by[(arm, None)]["reason"]
    assert by[("df11_compiled", None)]["status"] == "not_run" and "captured" in by[("df11_compiled", None)]["reason"]
    failed = by[("broken_build", None)]
    assert failed["status"] == "error" and failed["stage"] == "build" and "planted build failure" in failed["traceback"]
    for b in (1, 2):
        dense, ours, later = by[("dense", b)], by[("zstd_block", b)], by[("broken_later", b)]
        assert dense["status"] == "ok" and dense["vs_ref"] == 1.0 and dense["tok_s"] > 0
        assert ours["status"] == "ok" and ours["exact"] and ours["tokens_equal"] and ours["logits_equal"]
        assert ours["rounds"] == 2 and len(ours["vs_ref_per_round"]) == 2 and ours["vs_ref"] > 0
        assert ours["ratio"] > 1 and ours["compress_s"] is not None
        assert ours["peak_vram_bytes"] >= ours["weight_vram_bytes"]
        # b=1: its phase passes and the group's rounds fail, then its pair does; b=2: its phase fails
        assert later["status"] == "error" and later["stage"] == ("rounds" if b == 1 else "phase")
        assert "planted failure" in later["traceback"]
    assert by[("zstd_block", 1)]["rounds_arms"] == ["dense", "zstd_block"]  # rerun as a pair
    assert by[("zstd_block", 2)]["rounds_arms"] == ["dense", "zstd_block"]  # broken_later out after its phase
    # the offload group ran nothing (its arms are GPU arms), the compiled group's reference is a GPU arm
    assert not any(r["group"] in ("offload", "compiled") and r["status"] == "ok" for r in rows)
    table = out.with_suffix(".md").read_text()
    assert "| zstd + block (test) |" in table and "skipped: GPU arm" in table and "planted" in table
