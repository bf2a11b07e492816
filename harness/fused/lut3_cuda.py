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

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from harness.fused import lut3

MAX_TOKENS = 8  # tokens per launch (the mma's n); more tokens fall back to decode + matmul
_TEMPLATES = (1, 2, 4, 8)
_SOURCE = Path(__file__).with_name("lut3_kernel.cu")
_NAMES = [f"lut3_{v}_m{m}" for v in ("gemv", "gemv72", "ref") for m in _TEMPLATES] + ["lut3_decode", "lut3_decode_rows"]
_NAMES += ["lut3_diag1_m1"]  # bench/lut3_kernel.py only: the escapes left undecoded, to time what they cost
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


def address(t: torch.Tensor) -> list[int]:
    """A CUDA tensor's address as the kernels take it: two C ints (low, high 32 bits). torch's launcher passes
    Python ints as C ints, and the op passes weights as addresses rather than tensors: a compiled graph then has
    no weight among its inputs, whose per-replay checks cost host time per input (hundreds of inputs in a model).
    The caller keeps the tensor alive and in place for as long as the address is used."""
    ptr = t.data_ptr()
    lo, hi = ptr & 0xFFFFFFFF, ptr >> 32
    return [lo - (1 << 32) if lo >= 1 << 31 else lo, hi]


def addresses(p: lut3.Lut3) -> list[int]:
    """The four parts' addresses (signman, codes, esc_exp, esc_off), checked for the kernels' alignment."""
    if p.esc_exp.data_ptr() % 4 or p.signman.data_ptr() % 16 or p.codes.data_ptr() % 4:
        raise ValueError("lut3 kernel: signman must be 16-byte aligned and codes/esc_exp 4-byte aligned")
    return [*address(p.signman), *address(p.codes), *address(p.esc_exp), *address(p.esc_off)]


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


# The fused kernel the op launches: "lut3_gemv" (registers as the compiler allocates them) or "lut3_gemv72" (the
# same code held to 72 registers, for more warps per SM). CODECLLM_LUT3_KERNEL picks one for an A/B run of a whole
# model; bench/lut3_kernel.py times both per matrix.
def _chosen(env: str, choices: tuple[str, ...]) -> str:
    """The kernel an A/B run names in $env, else the first of `choices`."""
    name = os.environ.get(env, choices[0])
    if name not in choices:
        raise ValueError(f"{env}={name!r}: choose one of {', '.join(choices)}")
    return name


FUSED_KERNELS = ("lut3_gemv", "lut3_gemv72")
FUSED_KERNEL = _chosen("CODECLLM_LUT3_KERNEL", FUSED_KERNELS)

SMEM_PER_WARP_BYTES = 16 * 8 * 4  # lut3_kernel.cu's SMEM_PER_WARP: split-K partial sums


def _launch(name: str, tiles: int, warps: int, args: list) -> None:
    kernels()[name](grid=(tiles, 1, 1), block=(32 * warps, 1, 1), args=args, shared_mem=SMEM_PER_WARP_BYTES * warps)


def _gemv_launch(kernel: str, x2d, n: int, ptrs: list[int], lut: list[int], counter, warps=None):
    """The one launch of the fused kernel, shared by `gemv` and the op. `ptrs`: `addresses(p)`."""
    m, k = x2d.shape
    tiles, iters = -(-n // lut3.TILE_ROWS), k // lut3.ITER_K
    y = torch.empty((m, n), dtype=torch.bfloat16, device=x2d.device)
    _launch(f"{kernel}_m{_template(m)}", tiles, warps or warps_per_tile(tiles, iters, m),
            [x2d, m, k, *ptrs, *lut, y, n, iters, counter])  # fmt: skip
    return y


def gemv(
    x2d: torch.Tensor,
    p: lut3.Lut3,
    counter: torch.Tensor | None = None,
    warps: int | None = None,
    kernel: str | None = None,
):
    """x2d @ W.T for M <= 8 tokens, W decoded in registers. `counter` (int64, one element) counts launches.
    `kernel`: FUSED_KERNEL unless named; "lut3_diag1" is the bench's diagnostic variant (escapes left undecoded:
    wrong results on purpose)."""
    _check(x2d, p.shape[1])
    counter = counter if counter is not None else _scratch_counter(x2d.device)
    return _gemv_launch(kernel or FUSED_KERNEL, x2d, p.shape[0], addresses(p), list(p.lut_words()), counter, warps)


@dataclass
class Reference:
    """The uncompressed weight as the reference kernel reads it: W itself, in the kernel's stream order."""

    shape: tuple[int, int]
    tiles: int
    iters: int
    raw: torch.Tensor  # int16 stream: W (padding rows 0)


def reference_inputs(weight: torch.Tensor) -> Reference:
    """Built from W alone (not from the format): the same bf16 values, in the order the kernel's lanes take them."""
    n, k = weight.shape
    tiles, iters = -(-n // lut3.TILE_ROWS), k // lut3.ITER_K
    raw = weight.detach().contiguous().view(torch.int16)
    if tiles * lut3.TILE_ROWS != n:
        raw = torch.cat([raw, raw.new_zeros(tiles * lut3.TILE_ROWS - n, k)])
    return Reference((n, k), tiles, iters, lut3._stream_view(raw, tiles, iters).reshape(-1).contiguous())


def reference_gemv(x2d: torch.Tensor, ref: Reference, counter: torch.Tensor | None = None, warps: int | None = None):
    m, k = x2d.shape
    n = ref.shape[0]
    _check(x2d, k)
    y = torch.empty((m, n), dtype=torch.bfloat16, device=x2d.device)
    counter = counter if counter is not None else _scratch_counter(x2d.device)
    warps = warps or warps_per_tile(ref.tiles, ref.iters, m)
    _launch(f"lut3_ref_m{_template(m)}", ref.tiles, warps,
            [x2d, m, k, *address(ref.raw), y, n, ref.iters, counter])  # fmt: skip
    return y


# The decode kernel decode_gpu launches: "lut3_decode" (one warp per tile, 4-byte writes) or "lut3_decode_rows" (a
# candidate: a warp per DECODE_CHUNK iterations of a tile, whole rows written through shared memory).
# CODECLLM_LUT3_DECODE picks one for an A/B run; bench/lut3_kernel.py times both.
DECODE_KERNELS = ("lut3_decode", "lut3_decode_rows")
DECODE_KERNEL = _chosen("CODECLLM_LUT3_DECODE", DECODE_KERNELS)
DECODE_CHUNK = 4  # iterations per warp in lut3_decode_rows
_DECODE_ROW_BYTES = 36 * 4  # lut3_kernel.cu's DECODE_ROW_WORDS: a staged row of 64 bf16, padded


def decode_gpu(p: lut3.Lut3, out: torch.Tensor | None = None, kernel: str | None = None) -> torch.Tensor:
    """W as the kernel decodes it, written out row-major [N, K] by the kernel itself: must equal W bit for bit.
    `out`: a bf16 [N, K] buffer to write into (else a new one); `kernel`: DECODE_KERNEL unless named."""
    n, k = p.shape
    kernel = kernel or DECODE_KERNEL
    out = torch.empty((n, k), dtype=torch.bfloat16, device=p.device) if out is None else out
    if out.shape != (n, k) or out.dtype != torch.bfloat16 or not out.is_contiguous() or out.device != p.device:
        raise ValueError(f"decode_gpu: out must be a contiguous bf16 [{n}, {k}] on {p.device}")
    per_block = 4
    args = [*addresses(p), *p.lut_words(), out.view(torch.int32), n, k, p.tiles, p.iters]
    if kernel == "lut3_decode":
        kernels()[kernel](grid=(-(-p.tiles // per_block), 1, 1), block=(32 * per_block, 1, 1), args=args)
    else:
        warps = p.tiles * -(-p.iters // DECODE_CHUNK)
        kernels()[kernel](grid=(-(-warps // per_block), 1, 1), block=(32 * per_block, 1, 1),
                          args=[*args, DECODE_CHUNK], shared_mem=per_block * 16 * _DECODE_ROW_BYTES)  # fmt: skip
    return out


_COUNTERS: dict[torch.device, torch.Tensor] = {}


def _scratch_counter(device: torch.device) -> torch.Tensor:
    if device not in _COUNTERS:
        _COUNTERS[device] = torch.zeros(1, dtype=torch.int64, device=device)
    return _COUNTERS[device]


# ---- the op the fused policy calls: opaque to torch.compile, captured by CUDA graphs ----


@torch.library.custom_op("codecllm::lut3_linear", mutates_args=("counts",))
def lut3_linear(x2d: torch.Tensor, ptrs: list[int], lut: list[int], n: int, counts: torch.Tensor, slot: int) -> torch.Tensor:
    """x2d @ W.T (W in lut3 at `ptrs` = addresses(p), M <= 8 tokens); adds 1 to counts.view(-1)[slot] on the
    device. The weights are addresses, not tensors: see `address`."""
    return _gemv_launch(FUSED_KERNEL, x2d, n, ptrs, lut, counts.view(-1)[slot:])


@lut3_linear.register_fake
def _lut3_linear_fake(x2d, ptrs, lut, n, counts, slot):
    return x2d.new_empty((x2d.shape[0], n))
