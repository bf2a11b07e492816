"""Timing kernels the way a captured decode step runs them (and the matrix shapes the kernel benchmarks time): calls recorded once in a CUDA graph (no launch gaps
from the host), cycled over enough weight copies that the L2 cannot hold them, replays timed with CUDA events.
Shared by the kernel benchmarks (bench/lut3_kernel.py, bench/fused_kernel.py)."""

import math
import statistics

import torch

# The linear shapes of the Llama-3.1-8B and Llama-3.2-1B models, as the kernel benchmarks time them.
LLAMA_LINEARS = {  # name: (N out, K in, uses per decode step of the model)
    "8b.q_o": (4096, 4096, 64),
    "8b.k_v": (1024, 4096, 64),
    "8b.gate_up": (14336, 4096, 64),
    "8b.down": (4096, 14336, 32),
    "8b.lm_head": (128256, 4096, 1),
    "1b.q_o": (2048, 2048, 32),
    "1b.k_v": (512, 2048, 32),
    "1b.gate_up": (8192, 2048, 32),
    "1b.down": (2048, 8192, 16),
    "1b.lm_head": (128256, 2048, 1),
}


def graph_time_us(fns, min_launches=40, replays=7):
    """Median per-launch time of fns (one per weight copy) replayed from a CUDA graph."""
    loops = max(1, math.ceil(min_launches / len(fns)))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(loops):
            for f in fns:
                f()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / (loops * len(fns)))
    del g
    return statistics.median(times)


def copy_bandwidth():
    n = 1 << 30
    src, dst = torch.empty(n, dtype=torch.uint8, device="cuda"), torch.empty(n, dtype=torch.uint8, device="cuda")
    us = graph_time_us([lambda: dst.copy_(src)], min_launches=10)
    return 2 * n / (us * 1e-6) / 1e9  # bytes read + written
