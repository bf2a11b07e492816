"""Honest exactness (issue 12): what a compressed run's outputs say beyond `outputs_match`.

A fused kernel multiplies in its own arithmetic, not cuBLAS's, so its logits can differ from the dense model's in
the last bits even though every weight is lossless. Three figures separate the two causes:
  - `weights_lossless` (CompressedRuntime.lossless): every layer's decode matched its original;
  - `token_agreement`: the share of greedy tokens that equal the baseline's, position by position;
  - `exactness_reference`: the same prompts through the same kernel fed the uncompressed weights give logits
    torch.equal to the compressed run's, so any difference from dense is arithmetic, not compression.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from harness.generation import Generation, greedy_generate

if TYPE_CHECKING:
    from harness.phases.module import GenerationModule
    from harness.runtime.compress import CompressedRuntime


def token_agreement(baseline: list[list[int]], compressed: list[list[int]]) -> float | None:
    """Identical greedy tokens / tokens generated, over every prompt, position by position (a missing token counts
    as a difference). After a first difference the two continue from different text, so later matches are
    likelier to be chance: read 1.0 as "identical", anything less with the tokens at hand. None: no tokens."""
    same = total = 0
    for a, b in zip(baseline, compressed, strict=True):
        same += sum(x == y for x, y in zip(a, b, strict=False))
        total += max(len(a), len(b))
    return same / total if total else None


def exactness_reference(
    module: GenerationModule, runtime: CompressedRuntime, prompts: list[str], compressed: Generation
) -> bool | None:
    """Whether the compressed run's logits are torch.equal to those of the same model with every compressed layer
    on the reference kernel fed the uncompressed weights (the policy's `reference()`); None where there is no
    such reference (a policy that runs no kernel of its own, nothing compressed, or the CPU, where cache=fused
    decodes and F.linear computes exactly as the dense model does). One generation, with the phase's settings
    (compiled too: in Inductor's deterministic mode, as the compressed phase compiled, or the comparison would
    also compare two independently tuned compilations)."""
    policy = runtime.policy
    if not hasattr(policy, "reference") or not runtime.layers or runtime.device.type != "cuda":
        return None
    with policy.reference():
        out = greedy_generate(module.model, module.tokenizer, prompts, module.max_new_tokens, module.min_new_tokens,
                              device=runtime.device, compile=module.compile,
                              deterministic=module.deterministic_compile)  # fmt: skip
    if module.compile:  # the reference's graphs hold its inputs: nothing compiled runs after this
        from harness.phases.compiled import release_compiled

        release_compiled(module.model)
    # the phase hands its logits back on the CPU (Lightning's predict loop), the reference's stay where they ran
    logits = out.logits.to(compressed.logits.device)
    return logits.shape == compressed.logits.shape and torch.equal(logits, compressed.logits)
