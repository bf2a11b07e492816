"""One job, start to finish: config -> model -> baseline phase -> compression -> compressed phase -> results.

A short linear function (the lightning-hydra-template's `train`): every artifact goes under `run_dir`, and
results.json is rewritten after each phase so nothing measured is lost if a later phase fails.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationToMissingValueError, MissingMandatoryValue

from harness.artifacts import artifact_cache, compress_cached, model_identity
from harness.codecs import CODECS
from harness.codecs.base import dtype_name
from harness.components import build_codec, policy_factory
from harness.errors import HarnessError
from harness.exactness import exactness_reference
from harness.fidelity import bundled_tasks, per_sample_table
from harness.fidelity import compare as compare_fidelity
from harness.models import load_model, parse_dtype, resolve_device
from harness.results import ResultsFile, summary_table
from harness.runner.callbacks import REQUIRED
from harness.runner.compiled import release_compiled
from harness.runner.module import GenerationModule
from harness.runner.paired import SAME_MODEL, TWO_MODELS, PairedRounds, dense_twin, rounds_warmup, run_rounds
from harness.runner.phase import compare, run_phase
from harness.runtime import CAPTURED_POLICIES, POLICIES
from harness.runtime.fused import check_setup as check_fused
from harness.runtime.fused import refuse_transposed
from harness.runtime.policies import LRU
from harness.runtime.runtime import VERIFY_MODES, CompressedRuntime, check_placement
from harness.selection import ORDERS, Selection, parse_count, select_layers
from harness.tracking import make_tracker

log = logging.getLogger(__name__)


def validate(cfg: DictConfig) -> None:
    """Check what can be checked before the model loads: a typo must not cost a model load."""
    parse_count(cfg.compress.layers)
    if cfg.compress.order not in ORDERS:
        raise HarnessError(f"compress.order={cfg.compress.order!r} is invalid; valid: {', '.join(ORDERS)}")
    if cfg.compress.verify not in VERIFY_MODES:
        raise HarnessError(f"compress.verify={cfg.compress.verify!r} is invalid; valid: {', '.join(VERIFY_MODES)}")
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
    # The policy's own checks (an unknown name, cache.depth=0, an option it does not take; compiled: cache.ahead=1,
    # verify=always), on a runtime with no layers: otherwise they would only run when the compressed phase
    # starts, after the model load and the baseline.
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


def evaluate_counted(cfg: DictConfig, loaded, runtime) -> dict[str, Any]:
    """lm-eval on the model as it stands, counting forward passes (and decompressions) while it runs."""
    from harness.fidelity import evaluate

    passes = [0]
    hook = loaded.model.register_forward_pre_hook(lambda *_: passes.__setitem__(0, passes[0] + 1))
    if runtime is not None:
        runtime.reset_stats()
        runtime.attach(loaded.model)
    try:
        tasks = evaluate(
            loaded.model,
            loaded.tokenizer,
            list(cfg.eval.tasks),
            cfg.eval.limit,
            include_path=cfg.eval.include_path,
            batch_size=cfg.eval.batch_size,
            max_length=cfg.eval.max_length,
        )
    finally:
        hook.remove()
        if runtime is not None:
            runtime.end_generation()
            runtime.detach()
    counts: dict[str, Any] = {"forward_passes": passes[0]}
    if runtime is not None:
        snap = runtime.stats.snapshot()
        counts.update({k: snap[k] for k in ("decompressions", "decompressions_per_forward_pass", "decompress_time_s")})
    return {"tasks": tasks, "counts": counts}


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if isinstance(e, HarnessError) else f"{type(e).__name__}: {text}"


def resolved(cfg: DictConfig) -> dict[str, Any]:
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except (MissingMandatoryValue, InterpolationToMissingValueError) as e:
        match = re.search(r"Missing mandatory value: ?(\S+)", str(e))
        key = match.group(1) if match else getattr(e, "full_key", "?")
        raise HarnessError(f"{key} is required; set it on the command line, e.g. {key}=VALUE") from None


def paired_rounds(cfg: DictConfig, loaded, module: GenerationModule, runtime, callbacks) -> PairedRounds:
    """Baseline and compressed alternated, generate.rounds timed rounds (harness.runner.paired: the dense twin)."""
    twin = dense_twin(loaded.model, runtime)
    mechanism = SAME_MODEL if twin is loaded.model else TWO_MODELS
    # Its own GenerationModule even over the same model: each side keeps its own record of what it measured.
    base = GenerationModule(twin, loaded.tokenizer, module.max_new_tokens, module.min_new_tokens, compile=module.compile)
    try:
        return run_rounds(
            {"baseline": base, "compressed": module},
            {"baseline": callbacks(), "compressed": callbacks()},
            prompts=list(cfg.generate.prompts),
            rounds=rounds_of(cfg),
            warmup=rounds_warmup(cfg.generate.warmup, module.compile),
            accelerator="gpu" if loaded.model.device.type == "cuda" else "cpu",
            mechanism=mechanism,
        )
    finally:
        base.close()
        if twin is not loaded.model and module.compile:
            release_compiled(twin)  # its compiled step and CUDA graphs go with it
        del twin, base  # the twin's dense layers go now, before any later phase (fidelity) measures anything


def run(cfg: DictConfig, run_dir: Path, overrides: list[str], job_name: str = "harness") -> dict[str, Any]:
    config = resolved(cfg)
    results = ResultsFile(run_dir / "results.json", config, overrides)
    tracker = module = runtime = None
    fidelity_rows = None
    try:
        validate(cfg)
        device = resolve_device(cfg.device)
        results.update(device=str(device))
        loaded = load_model(cfg.model, device)
        selection = check_loaded(cfg, loaded.model)
        # After every check: a refused run leaves no W&B run behind (results.json records it).
        tracker = make_tracker(config["logger"], config, run_dir, job_name, overrides)
        accelerator = "gpu" if device.type == "cuda" else "cpu"
        compile_ = bool(cfg.generate.get("compile", False))
        module = GenerationModule(
            loaded.model, loaded.tokenizer, cfg.generate.max_new_tokens, cfg.generate.min_new_tokens, compile=compile_
        )
        phase_kwargs = dict(
            prompts=list(cfg.generate.prompts),
            repeats=cfg.generate.repeats,
            warmup=cfg.generate.warmup,
            accelerator=accelerator,
            logger=tracker.lightning_logger,
        )

        baseline = run_phase("baseline", module, make_callbacks(cfg), **phase_kwargs)
        results.update(baseline=baseline.as_dict())
        if cfg.eval.name == "fidelity":  # before compression: the model is compressed in place
            baseline_eval = evaluate_counted(cfg, loaded, runtime=None)
        if compile_:
            release_compiled(loaded.model)  # the dense step's graphs and their memory go before the compressed phase

        runtime = compress_cached(
            loaded.model,
            build_codec(cfg.compress),
            cache=artifact_cache(cfg.compress),
            identity=model_identity(loaded, cfg.model.kind),
            selection=selection,
            policy=policy_factory(cfg.cache),
            verify=cfg.compress.verify,
            attach=False,  # the CachePolicyBoundaries callback drives pass boundaries
            placement=cfg.compress.placement,
            captured=compile_,
        )
        module.runtime = runtime
        compressed = run_phase("compressed", module, make_callbacks(cfg), **phase_kwargs)
        lossless = runtime.lossless()
        results.update(  # the unpaired comparison first: if the rounds fail, the phases are still there
            compressed={**compressed.as_dict(), **runtime.report.as_dict()},
            comparison={**compare(baseline, compressed), **lossless, "exactness_reference": None},
            layers=runtime.layer_table(),
        )
        paired = paired_rounds(cfg, loaded, module, runtime, lambda: make_callbacks(cfg))
        rounds_comparison = {
            **compare(baseline, compressed, paired.ratio),
            **lossless,
            "exactness_reference": None,
            "rounds_mechanism": paired.mechanism,
            "rounds_outputs_match": all(paired.exact.values()),
        }
        results.update(rounds=paired.as_dict(), comparison=rounds_comparison)
        # After the timed work: the reference run builds its own inputs (and, compiled, its own graphs).
        reference = exactness_reference(module, runtime, list(cfg.generate.prompts), compressed.generation)
        if reference is not None:
            results.update(comparison={**rounds_comparison, "exactness_reference": reference})
        if cfg.eval.name == "fidelity":
            compressed_eval = evaluate_counted(cfg, loaded, runtime=runtime)
            fidelity = compare_fidelity(baseline_eval["tasks"], compressed_eval["tasks"])
            fidelity["counts"] = {"baseline": baseline_eval["counts"], "compressed": compressed_eval["counts"]}
            fidelity_rows = per_sample_table(baseline_eval["tasks"], compressed_eval["tasks"])
            results.update(fidelity=fidelity)
        results.update(status="completed")
    except BaseException as e:
        results.update(status="failed", error=one_line(e))
        raise
    finally:
        if runtime is not None:
            runtime.close()  # stops prefetch workers
        if module is not None:
            module.close()
        if tracker is not None:
            try:
                tracker.log_results(results.data, results.data.get("layers", []), fidelity_rows)
            except Exception as e:  # never lose the run over tracking
                log.warning("W&B logging failed: %s", e)
            tracker.finish(failed=results.data["status"] != "completed")
        # A table of dashes says nothing: a run refused before measuring anything ends with its error line.
        if results.data["status"] == "completed" or "baseline" in results.data:
            print(summary_table(results.data), flush=True)
        print(f"results: {results.path}", flush=True)
        if tracker is not None and tracker.sync_command:
            print(f"W&B offline run saved; upload with: {tracker.sync_command}", flush=True)
    return results.data
