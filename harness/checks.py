"""What a run checks before it measures: the config before the model loads (`validate`: a typo must not cost a
model load), the loaded model before the baseline phase (`check_loaded`), and the few config values the run
itself reads as checked values (`rounds_of`, `resolved`, `make_callbacks`).

The components check their own options in their constructors; `validate` builds them as the run will (codec,
policy on an empty runtime, callbacks), so those checks run early without being written twice.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationToMissingValueError, MissingMandatoryValue

from harness.codecs import CODECS
from harness.codecs.base import dtype_name
from harness.components import build_codec, policy_factory
from harness.errors import HarnessError
from harness.fidelity import bundled_tasks
from harness.models import parse_dtype, resolve_device
from harness.phases.callbacks import REQUIRED
from harness.runtime import CAPTURED_POLICIES, POLICIES
from harness.runtime.compress import CompressedRuntime, check_placement
from harness.runtime.fused import check_setup as check_fused
from harness.runtime.fused import refuse_transposed
from harness.runtime.policies import LRU
from harness.selection import Selection, check_order, parse_count, select_layers


def validate(cfg: DictConfig) -> None:
    """Check what can be checked before the model loads: a typo must not cost a model load."""
    parse_count(cfg.compress.layers)
    check_order(cfg.compress.order)
    if not isinstance(cfg.compress.get("embeddings", False), bool):
        raise HarnessError(f"compress.embeddings={cfg.compress.embeddings!r} is invalid; use true or false")
    device = resolve_device(cfg.device)  # first: device=cuda without CUDA is the error to see, not its consequences
    # Built here as the run builds them, so their constructors' checks run before the model loads.
    codec = build_codec(cfg.compress)
    policy = policy_factory(cfg.cache)
    check_dtype(codec, parse_dtype(cfg.model.get("dtype", "auto")))
    check_placement(cfg.compress.placement, codec)
    if codec.decode_device == "cuda" and device.type != "cuda":
        raise HarnessError(f"compress.codec={codec.name} decodes on the GPU but device={cfg.device}; use device=cuda")
    compile_ = validate_compile(cfg, codec)
    # compress.verify (the runtime's constructor) and the policy's own checks (an unknown name, cache.depth=0, an
    # option it does not take; compiled: cache.ahead=1, verify=always), on a runtime with no layers: otherwise they
    # would only run when the compressed phase starts, after the model load and the baseline.
    empty = CompressedRuntime(codec, verify=cfg.compress.verify)
    try:
        empty.set_policy(policy, captured=compile_)
        computes_linear = empty.policy.computes_linear
    finally:
        empty.close()
    if computes_linear:  # what no layer shows on an empty runtime: placement and embeddings, from the config
        check_fused(codec.name, cfg.compress.placement, device, bool(cfg.compress.get("embeddings", False)))
    make_callbacks(cfg)
    if cfg.generate.max_new_tokens < 1 or cfg.generate.repeats < 1:
        raise HarnessError("generate.max_new_tokens and generate.repeats must be >= 1")
    rounds_of(cfg)
    if not cfg.generate.prompts:
        raise HarnessError("generate.prompts is empty; give at least one prompt")
    if cfg.eval.name == "fidelity":
        validate_tasks(cfg)


# generate.rounds=auto: GPU rounds are cheap (well under a second each for a 1B model), so more of them buy a
# tighter IQR; on the CPU each costs a baseline plus a compressed generation (~1.7 s with SmolLM2 on the 2-core
# VM), and 5 keep `python -m harness` quick while still giving quartiles (docs/benchmarks.md).
AUTO_ROUNDS = {"cuda": 10, "cpu": 5}


def rounds_of(cfg: DictConfig) -> int:
    """generate.rounds as a count: an integer >= 1, or `auto` (AUTO_ROUNDS by device)."""
    rounds = cfg.generate.get("rounds", "auto")
    if rounds == "auto":
        return AUTO_ROUNDS[resolve_device(cfg.device).type]
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise HarnessError(f"generate.rounds={rounds!r} is invalid; use an integer >= 1 (paired rounds) or auto")
    return rounds


def validate_compile(cfg: DictConfig, codec) -> bool:
    """generate.compile, checked: which policies and codecs have a compiled form (the policies' constructors
    check their own options). Returns whether the run compiles."""
    compile_ = cfg.generate.get("compile", False)
    if not isinstance(compile_, bool):
        raise HarnessError(f"generate.compile={compile_!r} is invalid; use true or false")
    if not compile_:
        return False
    supported = ", ".join(CAPTURED_POLICIES.names())
    if cfg.cache.name not in CAPTURED_POLICIES:
        raise HarnessError(f"cache={cfg.cache.name} has no compiled form; with generate.compile=true use cache={supported}")
    if CAPTURED_POLICIES.get(cfg.cache.name).computes_linear:
        return True  # its own kernel, not the codec's decode, runs in the graphs: validate checked what it needs
    if resolve_device(cfg.device).type == "cuda" and (not codec.capturable or cfg.compress.placement != "gpu"):
        capturable = ", ".join(n for n in CODECS.names() if CODECS.get(n).capturable)
        raise HarnessError(
            f"generate.compile=true on CUDA needs a capturable codec ({capturable}) with compress.placement=gpu, "
            f"not {cfg.compress.codec} with placement={cfg.compress.placement}; CPU codecs run eagerly"
        )
    return True


def check_dtype(codec, dtype: torch.dtype | str) -> None:
    """A codec that stores some dtypes only refuses a model of another, before it loads (dtype=auto: after)."""
    if codec.dtypes is not None and dtype != "auto" and dtype not in codec.dtypes:
        names = ", ".join(dtype_name(d) for d in codec.dtypes)
        raise HarnessError(f"compress.codec={codec.name} stores {names} weights only, not {dtype_name(dtype)}; "
                           f"use model.dtype={dtype_name(codec.dtypes[0])}")  # fmt: skip


def make_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """A fresh set of phase callbacks, in config order. As in lightning-hydra-template's instantiate_callbacks,
    an entry set to null is skipped (callbacks.metrics=null: no per-generation metrics); one the phase needs
    (REQUIRED) cannot be, and anything that is not a callback config is refused in one line."""
    callbacks: list[L.Callback] = []
    for name, conf in (cfg.get("callbacks") or {}).items():
        if conf is None:
            continue
        if not isinstance(conf, DictConfig) or "_target_" not in conf:
            raise HarnessError(f"callbacks.{name}={conf!r} is not a callback config (a mapping with _target_) or null")
        try:
            callback = hydra.utils.instantiate(conf)
        except InstantiationException as e:
            raise HarnessError(f"callbacks.{name}: {str(e).strip().splitlines()[0]}") from None
        if not isinstance(callback, L.Callback):
            raise HarnessError(f"callbacks.{name}: {conf._target_} is not a lightning Callback")
        callbacks.append(callback)
    for cls, what in REQUIRED.items():
        if not any(isinstance(c, cls) for c in callbacks):
            raise HarnessError(f"callbacks: the phase needs a {cls.__name__} ({what}); only optional callbacks can be null")
    return callbacks


CALLBACKS_CONFIG = Path(__file__).with_name("conf") / "callbacks" / "default.yaml"


def default_callbacks() -> list[L.Callback]:
    """The phase callbacks a run gets (conf/callbacks/default.yaml), for code that runs phases without composing a
    config (the benches): the one list, not a copy of it."""
    return make_callbacks(OmegaConf.create({"callbacks": OmegaConf.load(CALLBACKS_CONFIG)}))


def check_loaded(cfg: DictConfig, model) -> Selection:
    """What needs the loaded model, checked before any phase runs: the layer count and the include/exclude
    patterns (by selecting the layers, once; the compression reuses this selection) and the lru budget against
    the largest selected layer; the model's dtype and each layer's shape against the codec (a weight the codec
    cannot store is skipped with its reason)."""
    codec = CODECS.get(cfg.compress.codec)
    check_dtype(codec, model.dtype)
    selection = select_layers(
        model,
        cfg.compress.layers,
        cfg.compress.order,
        cfg.compress.include,
        cfg.compress.exclude,
        bool(cfg.compress.get("embeddings", False)),
        refuse=codec.refuse,
    )
    if POLICIES.get(cfg.cache.name).computes_linear:  # a Conv1D (GPT-2) is neither: it stores W.T
        dense_kinds = torch.nn.Linear | torch.nn.Embedding
        refuse_transposed([c.name for c in selection.chosen if not isinstance(c.module, dense_kinds)])
    if cfg.cache.name == "lru":  # the policy's own rule, on the layers it will keep (linear ones, not embeddings)
        linear = [(c.name, c.nbytes) for c in selection.chosen if not isinstance(c.module, torch.nn.Embedding)]
        LRU.check_budget(cfg.cache.budget_mb, linear)
    return selection


def validate_tasks(cfg: DictConfig) -> None:
    """Unknown lm-eval task names fail before the model loads. Bundled names need no lm_eval import; others
    are looked up in lm-eval's index (7-11 s, paid again when the evaluation builds it)."""
    tasks = list(cfg.eval.tasks)
    if tasks and not cfg.eval.include_path and set(tasks) <= set(bundled_tasks()):
        return
    from harness.fidelity import _task_manager

    _task_manager(tasks, cfg.eval.include_path)


def resolved(cfg: DictConfig) -> dict[str, Any]:
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except (MissingMandatoryValue, InterpolationToMissingValueError) as e:
        match = re.search(r"Missing mandatory value: ?(\S+)", str(e))
        key = match.group(1) if match else getattr(e, "full_key", "?")
        raise HarnessError(f"{key} is required; set it on the command line, e.g. {key}=VALUE") from None
