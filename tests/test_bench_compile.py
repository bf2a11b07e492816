"""bench/bench_compile.py's post-run checks, on the CPU: the first step at which two runs' logits part, and the
integrity check that re-decodes every fused layer (and the reference's own copy of W) after the timed runs; and
that every arm the scripts and docs name exists (a device call is too dear to spend on a typo)."""

from __future__ import annotations

import copy
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from bench_compile import ARMS, BLOCK_ARMS, FUSED_ARMS, first_step_differ, integrity_after  # noqa: E402

from harness.codecs import make_codec  # noqa: E402
from harness.models import tiny_llama  # noqa: E402
from harness.runtime import compress_model  # noqa: E402


def test_first_step_differ():
    a = torch.zeros(4, 2, 3)
    assert first_step_differ(a, a.clone()) is None
    b = a.clone()
    b[2, 1, 0] = 1e-3
    b[3] = 1
    assert first_step_differ(a, b) == 2
    assert first_step_differ(a, a[:3]) == 0  # a different number of steps: parted from the start


def test_integrity_after_finds_a_changed_byte_in_the_bytes_and_in_the_reference():
    loaded = tiny_llama(seed=0)
    model = copy.deepcopy(loaded.model)
    rt = compress_model(model, make_codec("fused_lut3"), policy="fused", layers="all", progress=False)
    n = len(rt.linear_layers)
    assert integrity_after(rt) == {"layers": n, "decode_fails": [], "decode_fails_n": 0, "reference_fails": [],
                                   "reference_fails_n": 0}  # fmt: skip
    with rt.policy.reference():
        assert integrity_after(rt)["reference_fails_n"] == 0
        victim = rt.linear_layers[3]
        raw = rt.policy._reference[victim.index].raw
        raw[5] ^= 1  # the reference's copy of W changed under it
        got = integrity_after(rt)
        assert got["reference_fails"] == [victim.name] and got["decode_fails_n"] == 0
    sm = rt.policy._packed[victim.index].signman
    sm[0] ^= 1  # a sign/mantissa byte of the compressed weight
    got = integrity_after(rt)
    assert got["decode_fails"] == [victim.name] and got["decode_fails_n"] == 1


def test_every_arm_the_scripts_and_docs_name_exists():
    """The --arms of every bench_compile.py command in bench/*.sh, README.md and docs/*.md are arms it builds, and the
    fused arms' options are routes it knows or cache options."""
    root = Path(__file__).resolve().parents[1]
    named = {}
    for path in [*root.glob("bench/*.sh"), root / "README.md", *root.glob("docs/*.md")]:
        text = path.read_text().replace("\\\n", " ")
        for command in re.findall(r"bench_compile\.py[^\n]*", text):
            for arms in re.findall(r"--arms((?:\s+[a-z][a-z_]*)+)", command):
                named.update({arm: path.name for arm in arms.split()})
    # arms fused_table.sh names (on continued lines too): a pattern that stopped matching would pass vacuously
    assert {"dense_compiled", "block_compiled", "fused_ref_compiled", "fused_decoded_compiled"} <= set(named)
    unknown = {arm: where for arm, where in named.items() if arm not in ARMS}
    assert not unknown
    assert set(BLOCK_ARMS).isdisjoint(FUSED_ARMS)
    for _, _, options in FUSED_ARMS.values():
        assert options in ("sliced", "wide") or isinstance(options, dict)
