"""The LightningModule: greedy generation in predict_step, forward-pass boundaries dispatched to callbacks."""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import lightning as L

from harness.generation import Generation, greedy_generate
from harness.measure import MemoryReading, forward_pass_hooks


@dataclass
class PhaseRecord:
    """What the callbacks measured during one phase (one Trainer.predict call)."""

    warmup: list[bool] = field(default_factory=list)  # per generation
    times_s: list[float] = field(default_factory=list)
    gpu_times_s: list[float | None] = field(default_factory=list)  # CUDA events per generation; None on the CPU
    forward_passes: list[int] = field(default_factory=list)
    runtime_stats: list[dict[str, Any]] = field(default_factory=list)  # per generation, compressed phase only
    memory: MemoryReading | None = None
    passes_in_flight: int = 0


class GenerationModule(L.LightningModule):
    """Wraps an HF causal LM. One predict batch = one greedy generation of every prompt (batched)."""

    def __init__(self, model, tokenizer, max_new_tokens: int, min_new_tokens: int | None = None, compile: bool = False) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.min_new_tokens = min_new_tokens
        self.compile = compile  # static KV cache, decode step compiled and graph-replayed by transformers
        self.runtime = None  # the CompressedRuntime during the compressed phase
        self.phase = "baseline"
        self.record = PhaseRecord()
        self._predicting = False  # dispatch only inside Trainer.predict (lm-eval runs the model outside it)
        # One top-level forward = one generation step = one forward pass; callbacks see its boundaries.
        # The hooks hold a weak reference: a strong one would make model <-> module a cycle that keeps a finished
        # job's model (and its VRAM) alive until the garbage collector happens to run, skewing the next job's memory.
        ref = weakref.ref(self)
        self._hooks = forward_pass_hooks(model, lambda: (m := ref()) and m._dispatch("on_forward_pass_start"),
                                         lambda: (m := ref()) and m._dispatch("on_forward_pass_end"))

    @property
    def deterministic_compile(self) -> bool:
        """A compressed phase whose policy has an exactness reference compiles as the reference will
        (harness.generation.deterministic_compile), so that the two graphs differ only in the kernel. The baseline
        compiles in Inductor's default mode, as a speed-minded user runs it."""
        return self.runtime is not None and hasattr(self.runtime.policy, "reference")

    def close(self) -> None:
        """Remove the hooks from the wrapped model."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def on_predict_start(self) -> None:
        self._predicting = True

    def on_predict_end(self) -> None:
        self._predicting = False

    # Called from forward_pass_hooks, which keep it out of any compiled graph: when transformers compiles the
    # model's __call__ it runs eagerly between graphs, so pass boundaries and counters keep working under compile.
    def _dispatch(self, hook: str) -> None:
        trainer = self._trainer
        if trainer is None or not self._predicting:
            return
        for callback in trainer.callbacks:
            fn = getattr(callback, hook, None)
            if fn is not None:
                fn(trainer, self)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> Generation:
        return greedy_generate(
            self.model,
            self.tokenizer,
            batch["prompts"],
            self.max_new_tokens,
            min_new_tokens=self.min_new_tokens,
            device=self.trainer.strategy.root_device,
            compile=self.compile,
            deterministic=self.deterministic_compile,
        )
