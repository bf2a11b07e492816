"""Lightning callbacks of a phase: forward-pass counting, cache-policy boundaries, timing, memory, logging.

Each writes what it measures into `pl_module.record`. Order matters and is the config's order: the timer
stops before the cache callback ends the generation (dropping caches is not part of generating).
"""

from __future__ import annotations

import lightning as L

from harness.measure import MemoryMeter
from harness.rounds import Timer


class ForwardPassCounter(L.Callback):
    """Counts top-level forward passes per generation, in both phases."""

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        pl_module.record.passes_in_flight = 0
        pl_module.record.warmup.append(bool(batch["warmup"]))

    def on_forward_pass_start(self, trainer, pl_module):
        pl_module.record.passes_in_flight += 1

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        pl_module.record.forward_passes.append(pl_module.record.passes_in_flight)


class CachePolicyBoundaries(L.Callback):
    """Drives the compressed runtime: pass boundaries to the cache policy, counters reset per generation."""

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if pl_module.runtime is not None:
            pl_module.runtime.reset_stats()

    def on_forward_pass_start(self, trainer, pl_module):
        if pl_module.runtime is not None:
            pl_module.runtime.begin_pass()

    def on_forward_pass_end(self, trainer, pl_module):
        if pl_module.runtime is not None:
            pl_module.runtime.end_pass()

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if pl_module.runtime is not None:
            pl_module.runtime.end_generation()  # waits for prefetches in flight, so the counts are final
            pl_module.record.runtime_stats.append(pl_module.runtime.stats.snapshot())


class GenerationTimer(L.Callback):
    """Wall-clock time of each generation, device synchronised at both ends, and on CUDA its event time
    (harness.rounds.Timer: the one timer of the phases, the paired rounds and the benchmarks)."""

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._timer = Timer(trainer.strategy.root_device)
        self._timer.start()

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        timing = self._timer.stop()
        pl_module.record.times_s.append(timing.wall_s)
        pl_module.record.gpu_times_s.append(timing.gpu_s)


class PhaseMemory(L.Callback):
    """Device memory over the phase: allocated before/after and the peak (statistics reset at phase start)."""

    def on_predict_start(self, trainer, pl_module):
        self._meter = MemoryMeter(trainer.strategy.root_device)
        self._meter.start()

    def on_predict_end(self, trainer, pl_module):
        pl_module.record.memory = self._meter.stop()


class MetricsLogger(L.Callback):
    """Per-generation figures to the Trainer's logger (W&B when configured), keyed by phase."""

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if trainer.logger is None or batch["warmup"]:
            return
        record = pl_module.record
        phase = pl_module.phase
        metrics = {f"{phase}/generation_time_s": record.times_s[-1], f"{phase}/forward_passes": record.forward_passes[-1]}
        if record.runtime_stats:
            metrics[f"{phase}/decompressions"] = record.runtime_stats[-1]["decompressions"]
        trainer.logger.log_metrics(metrics, step=batch_idx)


# What a phase cannot do without: each fills a part of the PhaseRecord that the phase result reads. Only the
# others (MetricsLogger) may be set to null.
REQUIRED = {
    ForwardPassCounter: "forward-pass counts and warm-up flags",
    GenerationTimer: "generation times",
    CachePolicyBoundaries: "the compressed runtime's pass boundaries",
    PhaseMemory: "memory readings",
}
