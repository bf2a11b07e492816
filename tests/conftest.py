import copy
import functools
import importlib.util
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
CHROMIUM = Path("/usr/bin/chromium")  # Debian's package; the dashboard tests drive it headless


# ---------------------------------------------------------------- skipping, in one place


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a dotted name whose parent package is missing
        return False


def RunIf(  # noqa: N802 - named as a class, like lightning-hydra-template's, because it is used as a decorator
    min_gpus: int = 0,
    no_cuda: bool = False,
    chromium: bool = False,
    packages: tuple[str, ...] | list[str] = (),
    fork: bool = False,
):
    """A skip marker for what this machine lacks: `@RunIf(min_gpus=1, packages=["cupy"])`. Every requirement
    checks here, so a test says what it needs, never how to find out; the reason lists all that is missing.
    no_cuda: for tests of the error raised where CUDA is absent (they skip on a GPU machine)."""
    import torch

    missing = []
    if min_gpus and torch.cuda.device_count() < min_gpus:
        missing.append(f"{min_gpus} CUDA GPU{'s' if min_gpus > 1 else ''}")
    if no_cuda and torch.cuda.is_available():
        missing.append("a machine without CUDA (it checks the error raised there)")
    if chromium and not CHROMIUM.exists():
        missing.append(f"Debian's chromium at {CHROMIUM} (apt-get install chromium)")
    if fork and not hasattr(os, "fork"):
        missing.append("os.fork")
    missing += [f"the {name} package" for name in packages if not _installed(name)]
    return pytest.mark.skipif(bool(missing), reason="needs " + ", ".join(missing))


# ---------------------------------------------------------------- composed configs


@functools.cache
def _composed(overrides: tuple[str, ...], return_hydra_config: bool):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=return_hydra_config)


def compose_config(*overrides: str, return_hydra_config: bool = False):
    """conf/config.yaml composed with `overrides`, as `python -m harness OVERRIDES` composes it (the one place tests
    compose). Each distinct override list is composed once per session (Hydra's compose is ~0.1 s, and the
    parametrized config tests compose hundreds); callers get their own copy, free to change."""
    return copy.deepcopy(_composed(tuple(overrides), return_hydra_config))


# A tiny run that takes a second: greedy, 2 new tokens, one repeat, no W&B.
TINY_RUN = ("model=tiny", "logger=none", "generate.max_new_tokens=2", "generate.min_new_tokens=2",
            "generate.repeats=1", "generate.warmup=0")


def tiny_run_config(tmp_path: Path, *overrides: str):
    """The tiny run's config with its artifact cache under tmp_path (never the user's cache)."""
    return compose_config(*TINY_RUN, f"compress.artifact_dir={tmp_path / 'artifacts'}", *overrides)


# ---------------------------------------------------------------- the tiny model and its dense reference


@pytest.fixture(scope="session")
def tiny_dense():
    """The dense tiny Llama (seed 0), loaded once for the session. Shared: tests compress deep copies of it. At the
    end it is checked against a fresh one, so a test that changed it in place fails instead of skewing others."""
    import torch

    from harness.models import tiny_llama

    loaded = tiny_llama(seed=0)
    yield loaded
    fresh = tiny_llama(seed=0).model.state_dict()
    for name, tensor in loaded.model.state_dict().items():
        assert torch.equal(tensor, fresh[name]), f"a test changed the shared tiny model's {name}"


@pytest.fixture(scope="session")
def tiny_reference(tiny_dense):
    """`tiny_reference(prompts, new_tokens)`: the dense tiny model's greedy generation (tokens and logits), what
    every compressed run must reproduce bit for bit; computed once per (prompts, new_tokens) for the session."""
    from harness.generation import greedy_generate

    done = {}

    def reference(prompts, new_tokens: int):
        key = (tuple(prompts), new_tokens)
        if key not in done:
            done[key] = greedy_generate(tiny_dense.model, tiny_dense.tokenizer, list(prompts),
                                        max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        return done[key]

    return reference


def run_harness(args: list[str], cwd: Path, timeout: int = 600, env: dict | None = None):
    """`python -m harness ARGS` in a subprocess, as a user types it."""
    import subprocess

    full_env = {**os.environ, "PYTHONPATH": pythonpath(), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "harness", *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def pythonpath() -> str:
    """PYTHONPATH for a child Python: this checkout first, then what the parent had."""
    return os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])


@pytest.fixture
def harness_cli():
    return run_harness


def assert_refused(proc, message: str) -> str:
    """Bad input as a user must see it: exit code 2, one `error:` line naming `message`, at most 3 lines of
    output in all (no summary table of dashes, no traceback). Returns the error line."""
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(errors) == 1 and message in errors[0], lines
    assert len(lines) <= 3 and "Traceback" not in proc.stderr and "RESULTS SUMMARY" not in proc.stdout, lines
    return errors[0]


# What `slow` means: the test starts a process (the CLI, a sweep, an engine) or loads the real SmolLM2 model. Marked
# by rule, not by hand, so a new test is marked as soon as it does either: `pytest -m "not slow"` is the inner loop
# (library code, tiny in-process models); CI runs everything. (By hand only where no rule sees it: a test that
# makes lm-eval build its whole task index.)
_SLOW_SOURCE = ("run_harness(", "subprocess", "Popen", "smollm2", "_multirun(", "fidelity_run(")


def pytest_collection_modifyitems(config, items):
    import inspect

    for item in items:
        fn = getattr(item, "function", None)
        if fn is None or item.get_closest_marker("slow"):
            continue
        try:
            source = inspect.getsource(fn)
        except (OSError, TypeError):
            continue
        if "harness_cli" in getattr(item, "fixturenames", ()) or any(s in source for s in _SLOW_SOURCE):
            item.add_marker(pytest.mark.slow)


def assert_generation_bit_exact(loaded, reference, codec: str, policy: str, tokens: int = 4) -> None:
    """Every linear layer of the (session) tiny model in `codec` under `policy`: greedy logits and tokens equal the
    dense model's, bit for bit. `reference` is the tiny_reference fixture."""
    import copy

    import torch

    from harness.codecs import make_codec
    from harness.generation import greedy_generate
    from harness.runtime import compress_model

    prompts = ["The capital of France is", "Lossless"]
    ref = reference(prompts, tokens)
    model = copy.deepcopy(loaded.model)
    runtime = compress_model(model, make_codec(codec), layers="all", policy=policy, progress=False)
    try:
        out = greedy_generate(model, loaded.tokenizer, prompts, tokens, tokens)
        assert torch.equal(out.logits, ref.logits) and out.new_token_ids == ref.new_token_ids
    finally:
        runtime.close()
