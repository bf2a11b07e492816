"""One job, start to finish: config -> model -> baseline phase -> compression -> compressed phase -> results.

A short linear function (the lightning-hydra-template's `train`): every artifact goes under `run_dir`, and
results.json is rewritten after each phase so nothing measured is lost if a later phase fails.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from harness.artifacts import artifact_cache, compress_cached, model_identity
from harness.checks import check_loaded, make_callbacks, resolved, rounds_of, validate
from harness.components import build_codec, policy_factory
from harness.errors import HarnessError
from harness.exactness import exactness_reference
from harness.fidelity import compare as compare_fidelity
from harness.fidelity import per_sample_table
from harness.measure import forward_pass_hooks
from harness.models import load_model, resolve_device
from harness.phases.compiled import release_compiled
from harness.phases.module import GenerationModule
from harness.phases.paired import SAME_MODEL, TWO_MODELS, PairedRounds, dense_twin, rounds_warmup, run_rounds
from harness.phases.phase import compare, run_phase
from harness.results import ResultsFile, summary_table
from harness.tracking import make_tracker

log = logging.getLogger(__name__)


def evaluate_counted(cfg: DictConfig, loaded, runtime) -> dict[str, Any]:
    """lm-eval on the model as it stands, counting forward passes (and decompressions) while it runs."""
    from harness.fidelity import evaluate

    passes = [0]
    hooks = forward_pass_hooks(loaded.model, lambda: passes.__setitem__(0, passes[0] + 1))
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
        for hook in hooks:
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


def paired_rounds(cfg: DictConfig, loaded, module: GenerationModule, runtime, callbacks) -> PairedRounds:
    """Baseline and compressed alternated, generate.rounds timed rounds (harness.phases.paired: the dense twin)."""
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
