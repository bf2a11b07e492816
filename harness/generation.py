"""Greedy generation for a batch of prompts: the one workload both phases run."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass
class Generation:
    sequences: torch.Tensor  # [batch, prompt_len + new] token ids (prompts left-padded)
    new_token_ids: list[list[int]]  # per prompt, the generated ids only
    logits: torch.Tensor  # [steps, batch, vocab] raw logits of every generation step
    texts: list[str]  # decoded generated text per prompt


def compile_options(device: torch.device) -> dict:
    """`generate` arguments that run it as a speed-minded transformers user does: a static KV cache, with which
    transformers compiles the decode step itself (`torch.compile(mode="reduce-overhead")`: Inductor kernels
    replayed as CUDA graphs; the prefill stays eager). transformers compiles on accelerators only; on the CPU
    the same is asked for explicitly (Inductor's C++ kernels, no graphs)."""
    from transformers import CompileConfig

    if device.type == "cuda":
        return {"cache_implementation": "static"}
    config = CompileConfig(mode="default")
    config._compile_all_devices = True
    return {"cache_implementation": "static", "compile_config": config}


def deterministic_compile() -> contextlib.AbstractContextManager:
    """Inductor's deterministic mode for what compiles inside (torch._inductor.config.deterministic). In its default
    mode Inductor may time several configurations of a kernel on the device and keep the fastest, and for
    reductions (an RMSNorm's sum, say) configurations can sum in different orders: torch documents the mode as
    skipping "any on device benchmarking ... if we know they affect numerics". Two compilations of one model can
    then round differently. An exactness reference that compiles its own graphs tests only the kernel if both
    sides compile in this mode (docs/fused.md: on the Llama-8B shape the compiled fused run and its compiled
    reference parted at decode step 38 of 64 in some runs while eager they never did)."""
    import torch._inductor.config as inductor_config

    if not hasattr(inductor_config, "deterministic"):  # a torch without the mode: nothing to hold still
        return contextlib.nullcontext()
    return inductor_config.patch(deterministic=True)


@torch.inference_mode()
def greedy_generate(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    min_new_tokens: int | None = None,
    device: torch.device | None = None,
    compile: bool = False,
    deterministic: bool = False,
) -> Generation:
    """`deterministic`: with `compile`, what compiles here compiles in Inductor's deterministic mode
    (`deterministic_compile`); graphs compiled earlier replay as they are."""
    # An offloaded model (accelerate cpu_offload) keeps its parameters on "meta": the caller names the device.
    device = device or next(p.device for p in model.parameters())
    enc = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
    with deterministic_compile() if compile and deterministic else contextlib.nullcontext():
        out = model.generate(
            **(compile_options(device) if compile else {}),
            **enc,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            return_dict_in_generate=True,
            output_logits=True,
            temperature=None,
            top_p=None,
            top_k=None,
        )
    prompt_len = enc["input_ids"].shape[1]
    new = out.sequences[:, prompt_len:]
    ids = [[int(t) for t in row if t != tokenizer.pad_token_id] for row in new.tolist()]
    texts = tokenizer.batch_decode(new, skip_special_tokens=True)
    return Generation(sequences=out.sequences, new_token_ids=ids, logits=torch.stack(out.logits), texts=texts)
