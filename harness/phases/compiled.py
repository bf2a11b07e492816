"""What torch.compile actually did in a phase (from dynamo's and Inductor's own counters), and its cleanup."""

from __future__ import annotations

import torch


def reset_compile_counters() -> None:
    from torch._dynamo.utils import counters

    counters.clear()


def compile_mode(device: torch.device) -> str | bool:
    """ "cudagraphs" (Inductor kernels replayed as CUDA graphs), "inductor" (compiled, no graphs: the CPU, or a
    graph that Inductor refused to capture), or False (nothing was compiled). Read since the last reset."""
    from torch._dynamo.utils import counters

    if not counters["stats"]["unique_graphs"]:
        return False
    if device.type == "cuda" and not counters["inductor"]["cudagraph_skips"]:
        return "cudagraphs"
    return "inductor"


def compile_details() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return {
        "graphs": int(counters["stats"]["unique_graphs"]),
        "graph_breaks": int(sum(counters["graph_break"].values())),
        "cudagraph_skips": int(counters["inductor"]["cudagraph_skips"]),
    }


def release_compiled(model: torch.nn.Module) -> None:
    """Drop the compiled step and its CUDA graphs (their memory pool), so the next phase starts clean and its
    memory figures hold only its own graphs."""
    if "_compiled_call" in model.__dict__:
        del model.__dict__["_compiled_call"]
    torch._dynamo.reset()
    if torch.cuda.is_available():
        from torch._inductor import cudagraph_trees

        cudagraph_trees.reset_cudagraph_trees()
        torch.cuda.empty_cache()
