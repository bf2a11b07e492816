"""One phase (baseline or compressed): warm-up + timed repeats of the same generation through Trainer.predict."""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from harness.exactness import token_agreement
from harness.generation import Generation
from harness.measure import MemoryReading, model_weight_bytes, spread
from harness.phases.compiled import compile_details, compile_mode, reset_compile_counters
from harness.phases.module import GenerationModule, PhaseRecord
from harness.phases.strategy import stay_on
from harness.rounds import Timing, host_overhead

log = logging.getLogger(__name__)


@dataclass
class PhaseResult:
    name: str
    record: PhaseRecord
    generation: Generation  # the last timed repeat's output
    outputs_stable: bool  # every repeat produced the same tokens
    weights_bytes: int  # exact weight bytes on the model's device: dense + compressed there (no decompressed cache)
    compile: str | bool = False  # what torch.compile did: "cudagraphs" | "inductor" | False
    compile_details: dict[str, int] | None = None

    @property
    def timed(self) -> list[int]:
        return [i for i, w in enumerate(self.record.warmup) if not w]

    @property
    def memory(self) -> MemoryReading:
        return self.record.memory

    def counts(self) -> dict[str, Any]:
        """Counts of one generation; repeats must agree (checked, and reported if they do not)."""
        passes = {self.record.forward_passes[i] for i in self.timed}
        out: dict[str, Any] = {"forward_passes": self.record.forward_passes[self.timed[-1]], "counts_consistent": len(passes) == 1}
        if self.record.runtime_stats:
            stats = [self.record.runtime_stats[i] for i in self.timed]
            keys = ("decompressions", "decompressions_per_layer", "in_kernel_decodes_per_layer")
            out["counts_consistent"] &= all(s[k] == stats[-1][k] for s in stats for k in keys)
            out.update(stats[-1])
        return out

    def as_dict(self) -> dict[str, Any]:
        times = spread([self.record.times_s[i] for i in self.timed])
        new_tokens = sum(len(ids) for ids in self.generation.new_token_ids)
        warm = [t for t, w in zip(self.record.times_s, self.record.warmup, strict=True) if w]
        gpu = [self.record.gpu_times_s[i] for i in self.timed] if self.record.gpu_times_s else []
        on_gpu = bool(gpu) and None not in gpu
        return {
            "compile": self.compile,
            **({"compile_details": self.compile_details} if self.compile_details else {}),
            "warmup": len(warm),
            "warmup_time_s": sum(warm),  # compilation and graph capture happen here, outside the timed repeats
            "time_s": times["median"],
            "time_s_min": times["min"],
            "time_s_max": times["max"],
            # CUDA events around each timed generation (null on the CPU), and the wall time outside them
            "gpu_time_s": statistics.median(gpu) if on_gpu else None,
            "host_overhead_s": statistics.median(
                [host_overhead(Timing(self.record.times_s[i], self.record.gpu_times_s[i])) for i in self.timed]
            ) if on_gpu else None,
            "repeats": len(self.timed),
            "new_tokens": new_tokens,
            "tokens_per_s": new_tokens / times["median"] if times["median"] > 0 else 0.0,
            **self.counts(),
            "memory": {**self.memory.as_dict(), "weights_bytes": self.weights_bytes},
            "outputs_stable": self.outputs_stable,
            "output_texts": self.generation.texts,
            "output_token_ids": self.generation.new_token_ids,
        }


def run_phase(
    name: str,
    module: GenerationModule,
    callbacks: list[L.Callback],
    prompts: list[str],
    repeats: int,
    warmup: int,
    accelerator: str,
    logger: Any = False,
    progress: bool = True,
) -> PhaseResult:
    module.phase = name
    module.record = PhaseRecord()
    if module.compile:
        # dynamo compiles in the first decode step and Inductor's CUDA-graph trees record in a later one: two
        # untimed generations put both behind us before the first timed one.
        warmup = max(warmup, 2)
        reset_compile_counters()
    batches = [{"prompts": list(prompts), "warmup": i < warmup} for i in range(warmup + repeats)]
    trainer = L.Trainer(
        accelerator=accelerator,
        strategy=stay_on(module.model.device if accelerator == "cpu" else torch.device("cuda", torch.cuda.current_device())),
        logger=logger,
        callbacks=callbacks,
        enable_progress_bar=progress,
        enable_model_summary=False,
        enable_checkpointing=False,
        inference_mode=True,
    )
    log.info("phase %s: %d warm-up + %d timed generations of %d prompt(s)", name, warmup, repeats, len(prompts))
    outputs: list[Generation] = trainer.predict(module, dataloaders=DataLoader(batches, batch_size=None))
    timed = [g for g, w in zip(outputs, module.record.warmup, strict=True) if not w]
    stable = all(g.new_token_ids == timed[-1].new_token_ids for g in timed)
    weights = model_weight_bytes(module.model)
    if module.runtime is not None:  # compressed bytes count where they live: on the model's device or not
        device = module.model.device
        weights += sum(layer.ct.compressed_nbytes for layer in module.runtime.layers if layer.ct.payload.device == device)
    device = torch.device("cuda", torch.cuda.current_device()) if accelerator != "cpu" else torch.device("cpu")
    mode, details = (compile_mode(device), compile_details()) if module.compile else (False, None)
    return PhaseResult(name, module.record, timed[-1], stable, weights, mode, details)


def compare(baseline: PhaseResult, compressed: PhaseResult, paired: dict[str, Any] | None = None) -> dict[str, Any]:
    """Exactness, memory and speed of compressed against baseline. With `paired` (harness.phases.paired's
    figures) the speed ratio is the median of the paired rounds, `slowdown` its inverse; without it, the ratio
    of the two phases' medians (measured minutes apart: the host's drift is in it)."""
    a, b = baseline.generation, compressed.generation
    same_shape = a.logits.shape == b.logits.shape
    diff = (a.logits.float() - b.logits.float()).abs().max().item() if same_shape else float("inf")
    tokens_match = a.new_token_ids == b.new_token_ids
    base_t, comp_t = baseline.as_dict()["time_s"], compressed.as_dict()["time_s"]
    sequential = base_t / comp_t if comp_t > 0 else float("inf")
    speed = paired or {"speed_ratio": sequential, "speed_ratio_q1": None, "speed_ratio_q3": None, "rounds": 0}
    ratio = speed["speed_ratio"]
    return {
        **speed,
        "slowdown": 1 / ratio if ratio > 0 else float("inf"),
        "sequential_speed_ratio": sequential,  # the two phases' medians, unpaired: kept to show the drift
        "peak_memory_ratio": compressed.memory.peak_bytes / baseline.memory.peak_bytes,
        "weights_bytes_ratio": compressed.weights_bytes / baseline.weights_bytes,
        "token_ids_match": tokens_match,
        "token_agreement": token_agreement(a.new_token_ids, b.new_token_ids),
        "logits_equal": bool(same_shape and torch.equal(a.logits, b.logits)),
        "outputs_match": bool(tokens_match and same_shape and torch.equal(a.logits, b.logits)),
        "max_abs_logit_diff": diff,
    }
