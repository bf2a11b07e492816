"""The lut3 kernels on CUDA: compiled once per process by NVRTC (through torch, no extra package), launched on the
current stream, and registered as torch ops that torch.compile keeps opaque and CUDA graphs capture.

    y = gemv(x2d, packed)                 # x2d [M <= 8, K] bf16 -> [M, N] bf16, W decoded in registers
    y = reference_gemv(x2d, ref)          # the same kernel fed the uncompressed weights (exactness reference)
    w = decode_gpu(packed)                # the kernel's decode written out: bit-exactness check of the GPU path
    torch.ops.codecllm.lut3_linear(...)   # the op the fused policy calls (counts its launches on the device)

Why NVRTC and not Triton: the decode is byte permutes (PRMT) and tensor-core fragments in a fixed register layout;
CUDA states both directly, and torch ships NVRTC, so nothing is built at install time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from harness.fused import lut3

MAX_TOKENS = 8  # tokens per launch (the mma's n); more tokens fall back to decode + matmul
_TEMPLATES = (1, 2, 4, 8)
_SOURCE = Path(__file__).with_name("lut3_kernel.cu")
_NAMES = [f"lut3_gemv_m{m}" for m in _TEMPLATES] + [f"lut3_ref_m{m}" for m in _TEMPLATES] + ["lut3_decode"]
# bench/lut3_kernel.py only: escapes skipped; decode skipped too; the escape loop alone skipped; 64 registers
_NAMES += ["lut3_diag1_m1", "lut3_diag2_m1", "lut3_diag3_m1", "lut3_gemvlb_m1"]
_kernels: dict | None = None
# warps per tile by (tiles, iters, tokens), set by tune(); otherwise warps_per_tile's heuristic
_WARPS: dict[tuple[int, int, int], int] = {}


def kernels() -> dict:
    """name -> launchable kernel; compiled on first use (about a second)."""
    global _kernels
    if _kernels is None:
        from torch.cuda._utils import _cuda_load_module, _nvrtc_compile

        binary, _ = _nvrtc_compile(_SOURCE.read_text(), "lut3_decode")
        _kernels = _cuda_load_module(binary, _NAMES)
    return _kernels


def kernel_resources(name: str) -> dict:
    """Registers, local (spill) and static shared bytes of a compiled kernel, read from the driver."""
    import ctypes

    from torch.cuda._utils import _get_gpu_runtime_library

    libcuda, func = _get_gpu_runtime_library(), kernels()[name].func
    out = {}
    for key, attr in (("registers", 4), ("local_bytes", 3), ("shared_bytes", 1)):
        v = ctypes.c_int()
        libcuda.cuFuncGetAttribute(ctypes.byref(v), attr, func)
        out[key] = v.value
    return out


def warps_per_tile(tiles: int, iters: int, tokens: int = 1) -> int:
    """Split-K inside a block: what `tune` measured for this shape, else at least 4 warps per tile and about 4096
    warps in all (enough loads in flight on 132 SMs; the H200 sweeps in docs/fused.md), at most 16 per block
    and never more warps than K iterations."""
    key = (tiles, iters, tokens)
    if key in _WARPS:
        return _WARPS[key]
    s = 4
    while s < 16 and tiles * s < 4096:
        s *= 2
    while s > 1 and s > iters:
        s //= 2
    return s


def tune(p: lut3.Lut3, tokens: int, candidates: tuple[int, ...] = (2, 4, 8, 16), repeats: int = 20) -> int:
    """Time the kernel on `p` at each warps-per-tile candidate (CUDA events) and keep the fastest for its shape.
    Call before CUDA-graph capture: it synchronizes."""
    x = torch.randn(tokens, p.shape[1], device=p.device).to(torch.bfloat16)
    best, best_s = None, float("inf")
    for w in candidates:
        if w > p.iters:
            continue
        gemv(x, p, warps=w)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(repeats):
            gemv(x, p, warps=w)
        b.record()
        b.synchronize()
        if a.elapsed_time(b) < best_s:
            best, best_s = w, a.elapsed_time(b)
    set_warps(p.tiles, p.iters, tokens, best)
    return best


def set_warps(tiles: int, iters: int, tokens: int, warps: int) -> None:
    _WARPS[(tiles, iters, tokens)] = warps


def _template(m: int) -> int:
    for t in _TEMPLATES:
        if m <= t:
            return t
    raise ValueError(f"lut3 kernel: {m} tokens > {MAX_TOKENS}")


def _check(x2d: torch.Tensor, k: int) -> None:
    if x2d.dtype != torch.bfloat16 or not x2d.is_contiguous() or x2d.shape[1] != k:
        raise ValueError(f"lut3 kernel wants contiguous bf16 [M, {k}], got {x2d.dtype} {tuple(x2d.shape)}")


SMEM_PER_WARP_BYTES = 16 * 32 * 4 + 16 * 8 * 4  # lut3_kernel.cu's SMEM_PER_WARP: escape buckets + split-K sums


def _launch(name: str, tiles: int, warps: int, args: list) -> None:
    kernels()[name](grid=(tiles, 1, 1), block=(32 * warps, 1, 1), args=args, shared_mem=SMEM_PER_WARP_BYTES * warps)


def _gemv_launch(kernel: str, x2d, n: int, signman, codes, esc_exp, esc_off, lut: list[int], counter, warps=None):
    """The one launch of the fused kernel, shared by `gemv` and the op."""
    m, k = x2d.shape
    tiles, iters = -(-n // lut3.TILE_ROWS), k // lut3.ITER_K
    y = torch.empty((m, n), dtype=torch.bfloat16, device=x2d.device)
    _launch(f"{kernel}_m{_template(m)}", tiles, warps or warps_per_tile(tiles, iters, m),
            [x2d, m, k, signman, codes, esc_exp, esc_off, *lut, y, n, iters, counter])  # fmt: skip
    return y


def gemv(
    x2d: torch.Tensor,
    p: lut3.Lut3,
    counter: torch.Tensor | None = None,
    warps: int | None = None,
    kernel: str = "lut3_gemv",
):
    """x2d @ W.T for M <= 8 tokens, W decoded in registers. `counter` (int64, one element) counts launches.
    `kernel="lut3_diag1"`/`"lut3_diag2"`: the bench's diagnostic variants (wrong results on purpose)."""
    _check(x2d, p.shape[1])
    if p.esc_exp.data_ptr() % 4 or p.signman.data_ptr() % 16 or p.codes.data_ptr() % 4:
        raise ValueError("lut3 kernel: signman must be 16-byte aligned and codes/esc_exp 4-byte aligned")
    counter = counter if counter is not None else _scratch_counter(x2d.device)
    return _gemv_launch(kernel, x2d, p.shape[0], p.signman, p.codes, p.esc_exp, p.esc_off, list(p.lut_words()),
                        counter, warps)  # fmt: skip


@dataclass
class Reference:
    """The uncompressed weight as the reference kernel reads it (built from W itself, not from the format)."""

    shape: tuple[int, int]
    tiles: int
    iters: int
    main: torch.Tensor  # int16 stream: W with escaped weights' exponent zeroed (what the main pass multiplies)
    mask: torch.Tensor  # int32 per (tile, iteration, lane): escape bits in the kernel's order
    raw: torch.Tensor  # int16 stream: W


def reference_inputs(weight: torch.Tensor, exponents: tuple[int, ...]) -> Reference:
    n, k = weight.shape
    tiles, iters = -(-n // lut3.TILE_ROWS), k // lut3.ITER_K
    pad = tiles * lut3.TILE_ROWS - n
    raw = weight.detach().contiguous().view(torch.int16)
    main = lut3.main_pass_weight(weight.detach().contiguous(), exponents).view(torch.int16)
    member = torch.zeros(256, dtype=torch.bool, device=weight.device)
    member[torch.tensor(list(exponents), device=weight.device)] = True
    esc = ~member[(raw.to(torch.int32) >> 7) & 0xFF]
    if pad:
        raw, main = (torch.cat([t, t.new_zeros(pad, k)]) for t in (raw, main))
        esc = torch.cat([esc, esc.new_zeros(pad, k)])
    esc_s = lut3._stream_view(esc, tiles, iters).to(torch.int64)
    bits = torch.zeros(esc_s.shape[:-1], dtype=torch.int64, device=weight.device)
    for b in range(32):
        bits |= esc_s[..., 8 * (b & 3) + (b >> 2)] << b
    mask = torch.where(bits >= 1 << 31, bits - (1 << 32), bits).to(torch.int32).reshape(-1)
    return Reference((n, k), tiles, iters, lut3._stream_view(main, tiles, iters).reshape(-1).contiguous(), mask,
                     lut3._stream_view(raw, tiles, iters).reshape(-1).contiguous())  # fmt: skip


def reference_gemv(x2d: torch.Tensor, ref: Reference, counter: torch.Tensor | None = None, warps: int | None = None):
    m, k = x2d.shape
    n = ref.shape[0]
    _check(x2d, k)
    y = torch.empty((m, n), dtype=torch.bfloat16, device=x2d.device)
    counter = counter if counter is not None else _scratch_counter(x2d.device)
    warps = warps or warps_per_tile(ref.tiles, ref.iters, m)
    _launch(f"lut3_ref_m{_template(m)}", ref.tiles, warps,
            [x2d, m, k, ref.main, ref.mask, ref.raw, y, n, ref.iters, counter])  # fmt: skip
    return y


def decode_gpu(p: lut3.Lut3) -> torch.Tensor:
    """W as the kernel decodes it (main-pass decode + escapes patched), un-permuted: must equal W bit for bit."""
    out = torch.empty(p.tiles * p.iters * 32 * 16, dtype=torch.int32, device=p.device)
    hi0, hi1, lo0, lo1 = p.lut_words()
    per_block = 4
    kernels()["lut3_decode"](grid=(-(-p.tiles // per_block), 1, 1), block=(32 * per_block, 1, 1),
                             args=[p.signman, p.codes, p.esc_exp, p.esc_off, hi0, hi1, lo0, lo1, out, p.tiles,
                                   p.iters])  # fmt: skip
    bits = out.view(torch.int16).reshape(p.tiles, p.iters, 32, 32)
    return lut3._unstream(bits, p.tiles, p.iters)[: p.shape[0]].contiguous().view(torch.bfloat16)


_COUNTERS: dict[torch.device, torch.Tensor] = {}


def _scratch_counter(device: torch.device) -> torch.Tensor:
    if device not in _COUNTERS:
        _COUNTERS[device] = torch.zeros(1, dtype=torch.int64, device=device)
    return _COUNTERS[device]


# ---- the op the fused policy calls: opaque to torch.compile, captured by CUDA graphs ----


@torch.library.custom_op("codecllm::lut3_linear", mutates_args=("counts",))
def lut3_linear(
    x2d: torch.Tensor,
    signman: torch.Tensor,
    codes: torch.Tensor,
    esc_exp: torch.Tensor,
    esc_off: torch.Tensor,
    lut: list[int],
    n: int,
    counts: torch.Tensor,
    slot: int,
) -> torch.Tensor:
    """x2d @ W.T (W in lut3, M <= 8 tokens); adds 1 to counts.view(-1)[slot] on the device."""
    return _gemv_launch("lut3_gemv", x2d, n, signman, codes, esc_exp, esc_off, lut, counts.view(-1)[slot:])


@lut3_linear.register_fake
def _lut3_linear_fake(x2d, signman, codes, esc_exp, esc_off, lut, n, counts, slot):
    return x2d.new_empty((x2d.shape[0], n))
