"""Paired rounds: baseline and compressed generations alternated inside one run, for a speed ratio the host's
drift does not land in (harness.rounds has the arithmetic; this runs the generations).

Mechanism: two model objects. After the sequential phases (which keep each side's memory figures honest: only
that side's weights are resident while it is measured), `dense_twin` rebuilds the baseline as a second model
object whose compressed layers are dense again, decoded from the compressed bytes (lossless: bit-identical to
the original weights, checked by checksum); every parameter that was never compressed is shared, not copied.
The twin costs the dense bytes of the compressed layers, nothing else. Two objects rather than swapping modules
in one: each side keeps its own torch.compile'd step (transformers stores it on the model), so no swap
invalidates what dynamo traced, and each side's warm-up before round 1 is the only compilation there is.
With nothing compressed (`compress.layers=0`) the twin *is* the model: both sides run the same module objects.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader

from harness.codecs.base import checksum
from harness.errors import IntegrityError
from harness.phases.callbacks import MetricsLogger, PhaseMemory
from harness.phases.module import GenerationModule, PhaseRecord
from harness.phases.strategy import stay_on
from harness.rounds import Timing, alternate, host_overhead, paired_speed_ratio, quartiles
from harness.runtime.compress import CompressedRuntime
from harness.runtime.embedding import CompressedEmbedding

log = logging.getLogger(__name__)

TWO_MODELS = "two_models"  # a dense twin rebuilt by decoding, uncompressed parameters shared
SAME_MODEL = "same_model"  # nothing compressed: both sides are one model object


def dense_twin(model: nn.Module, runtime: CompressedRuntime | None) -> nn.Module:
    """A second model object, dense again: every compressed layer decoded back into nn.Linear / nn.Embedding
    (transformers' Conv1D for a transposed layer); every other parameter and buffer shared with `model`."""
    if runtime is None or not runtime.layers:
        return model
    memo: dict[int, Any] = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    for layer in runtime.layers:
        memo[id(layer)] = _dense_module(layer, runtime)
    # deepcopy would copy these by reference: the compressed model's compiled step (it would run the compressed
    # model) and its hooks (they would dispatch into the compressed side's GenerationModule).
    compiled = model.__dict__.pop("_compiled_call", None)
    try:
        twin = copy.deepcopy(model, memo)
    finally:
        if compiled is not None:
            model.__dict__["_compiled_call"] = compiled
    for module in twin.modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            hooks.clear()
    return twin


def _dense_module(layer, runtime: CompressedRuntime) -> nn.Module:
    w = runtime.codec.decode(layer.ct).to(runtime.device)
    if checksum(w) != layer.ct.checksum:
        raise IntegrityError(f"layer {layer.name}: decoded weight fails its checksum; cannot rebuild the dense twin")
    weight = nn.Parameter(w, requires_grad=False)
    if isinstance(layer, CompressedEmbedding):
        return nn.Embedding.from_pretrained(weight, freeze=True, padding_idx=layer.padding_idx)
    if layer.transposed:
        from transformers.pytorch_utils import Conv1D

        module = Conv1D(layer.out_features, layer.in_features)
    else:
        module = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    module.weight = weight
    module.bias = layer.bias  # the same Parameter object: shared, as it was never compressed
    return module


@dataclass
class PairedRounds:
    mechanism: str
    warmup: int  # untimed rounds before round 1 (each side once per warm-up round)
    orders: list[list[str]]
    records: dict[str, PhaseRecord]  # per side, the reference side first: every generation, warm-ups flagged
    exact: dict[str, bool] = field(default_factory=dict)  # per other side: every round's outputs equal the reference's
    ratios: dict[str, dict[str, Any]] = field(default_factory=dict)  # per other side: paired_speed_ratio vs reference

    @property
    def ratio(self) -> dict[str, Any]:
        """The first other side's figures (the CLI run has exactly one: compressed)."""
        return next(iter(self.ratios.values()))

    def timed(self, side: str) -> list[int]:
        return [i for i, w in enumerate(self.records[side].warmup) if not w]

    def times(self, side: str) -> list[float]:
        return [self.records[side].times_s[i] for i in self.timed(side)]

    def gpu_times(self, side: str) -> list[float] | None:
        gpu = [self.records[side].gpu_times_s[i] for i in self.timed(side)]
        return None if None in gpu else gpu

    def side_dict(self, side: str) -> dict[str, Any]:
        rec, idx = self.records[side], self.timed(side)
        q1, med, q3 = quartiles(self.times(side))
        gpu = self.gpu_times(side)
        out = {"time_s": med, "time_s_q1": q1, "time_s_q3": q3, "times_s": self.times(side),
               "gpu_time_s": quartiles(gpu)[1] if gpu else None, "gpu_times_s": gpu,
               "host_overhead_s": quartiles([host_overhead(Timing(rec.times_s[i], rec.gpu_times_s[i]))
                                             for i in idx])[1] if gpu else None,
               "forward_passes": [rec.forward_passes[i] for i in idx]}
        if rec.runtime_stats:
            out["decompressions"] = [rec.runtime_stats[i]["decompressions"] for i in idx]
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"mechanism": self.mechanism, "warmup_rounds": self.warmup, "orders": self.orders,
                "outputs_match": all(self.exact.values()), **self.ratio,
                **{side: self.side_dict(side) for side in self.records}}


def rounds_warmup(warmup: int, compile_: bool) -> int:
    """Untimed rounds before round 1. The compressed side is warm from its phase, but the dense twin is a new
    object: its first generation pays dynamo's tracing and Inductor's compilation (and on CUDA, lazy kernel
    loading and cuBLAS heuristics are warm from the baseline phase, CUDA-graph recording is not). Compiled,
    graph trees record in a later step than the one that compiles: two untimed generations per side, as in
    run_phase. Eager, one is enough: nothing is built on the first call that is not built in the phases."""
    return max(warmup, 2 if compile_ else 1)


def run_rounds(
    modules: dict[str, GenerationModule],
    callbacks: dict[str, list[L.Callback]],
    prompts: list[str],
    rounds: int,
    warmup: int,
    accelerator: str,
    mechanism: str,
) -> PairedRounds:
    """`warmup` untimed rounds, then `rounds` timed ones; each round one generation per side, the order rotated
    per round (harness.rounds.alternate). The first side is the reference every other is paired with. The memory callbacks are left out: memory is the phases' figure, and
    an RSS sampler thread would only add noise to the timings. Per-round figures go to W&B as a table
    (harness.tracking), not as step metrics: the phases already used those steps."""
    sides = list(modules)
    trainers = {}
    for side, module in modules.items():
        module.phase = f"rounds/{side}"
        module.record = PhaseRecord()
        keep = [c for c in callbacks[side] if not isinstance(c, PhaseMemory | MetricsLogger)]
        device = module.model.device if accelerator == "cpu" else torch.device("cuda", torch.cuda.current_device())
        trainers[side] = L.Trainer(accelerator=accelerator, strategy=stay_on(device), logger=False, callbacks=keep,
                                   enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                                   inference_mode=True)
    orders = alternate(sides, warmup + rounds)
    log.info("paired rounds (%s): %d warm-up + %d timed rounds of %s", mechanism, warmup, rounds, " / ".join(sides))
    ref, others = sides[0], sides[1:]
    exact = dict.fromkeys(others, True)
    for r, order in enumerate(orders):
        outs = {}
        for side in order:
            batch = [{"prompts": list(prompts), "warmup": r < warmup}]
            outs[side] = trainers[side].predict(modules[side], dataloaders=DataLoader(batch, batch_size=None))[0]
        for side in others:
            exact[side] &= outs[side].new_token_ids == outs[ref].new_token_ids and torch.equal(
                outs[side].logits, outs[ref].logits)
    records = {side: modules[side].record for side in sides}
    result = PairedRounds(mechanism, warmup, orders[warmup:], records, exact)
    result.ratios = {side: paired_speed_ratio(result.times(ref), result.times(side)) for side in others}
    return result
