"""The lut3 kernels on CUDA: compiled once per process by NVRTC (through torch, no extra package), launched on the
current stream, and registered as torch ops that torch.compile keeps opaque and CUDA graphs capture.

    y = gemv(x2d, packed)                 # x2d [M <= 32, K] bf16 -> [M, N] bf16, W decoded in registers
    y = reference_gemv(x2d, ref)          # the same kernel fed the uncompressed weights (exactness reference)
    w = decode_gpu(packed)                # the kernel's decode written out: bit-exactness check of the GPU path
    torch.ops.codecllm.lut3_linear(...)   # the op the fused policy calls (counts its launches on the device)

Why NVRTC and not Triton: the decode is byte permutes (PRMT) and tensor-core fragments in a fixed register layout;
CUDA states both directly, and torch ships NVRTC, so nothing is built at install time.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from harness.fused import lut3
from harness.fused.launch import INT, PTR, Launch

MAX_TOKENS = 8  # tokens per launch of the decode-step builds (the mma's n); more fall back to decode + matmul
WIDE_TOKENS = 32  # the wide builds (lut3_gemv_m16/24/32: one mma per 8 tokens): a short prefill in one launch
_TEMPLATES = (1, 2, 4, 8)
_WIDE_TEMPLATES = (16, 24, 32)
_SOURCE = Path(__file__).with_name("lut3_kernel.cu")
_BUILDS = ("gemv", "gemv72", "gemvb", "gemvb72", "gemvc", "gemvc72", "gemvcp", "gemvcp72")
_WIDE_BUILDS = ("gemv", "gemvb")  # the families with wide builds (lane, ballot)
_NAMES = [f"lut3_{v}_m{m}" for v in (*_BUILDS, "ref") for m in _TEMPLATES]
_NAMES += [f"lut3_{v}_m{m}" for v in (*_WIDE_BUILDS, "ref") for m in _WIDE_TEMPLATES]
_NAMES += ["lut3_decode"]
_NAMES += ["lut3_diag1_m1"]  # bench/lut3_kernel.py only: the escapes left undecoded, to time what they cost
_kernels: dict | None = None


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
    """Split-K inside a block: at least 4 warps per tile and about 4096 warps in all at 1-2 tokens, 2048 at more
    (enough loads in flight on 132 SMs; each token adds registers and work per warp), at most 16 per block and
    never more warps than K iterations. On the H200 this picks the fastest of 4/8/16 for every Llama-8B matrix at
    1 and at 8 tokens, timed with the L2 flushed (docs/fused.md). An autotune (CUDA events around back-to-back launches
    from Python) was tried and dropped: its choices disagreed with the flushed-L2 timings, and with them the
    fused kernels took 7.2 ms of an 8B step in the model, against 4.6 ms summed per matrix with these."""
    target = 4096 if tokens <= 2 else 2048
    s = 4
    while s < 16 and tiles * s < target:
        s *= 2
    while s > 1 and s > iters:
        s //= 2
    return s


def _template(m: int) -> int:
    for t in (*_TEMPLATES, *_WIDE_TEMPLATES):
        if m <= t:
            return t
    raise ValueError(f"lut3 kernel: {m} tokens > {WIDE_TOKENS}")


def _check(x2d: torch.Tensor, k: int) -> None:
    if x2d.dtype != torch.bfloat16 or not x2d.is_contiguous() or x2d.shape[1] != k:
        raise ValueError(f"lut3 kernel wants contiguous bf16 [M, {k}], got {x2d.dtype} {tuple(x2d.shape)}")


# The fused kernel's builds, in families of two: "lut3_gemv" (registers as the compiler allocates them: 64 and a
# 16-byte spill at 1-2 tokens, 77 at 4-8) and "lut3_gemv72" (the same code held to 72 registers, no spill, more
# warps per SM). On the H200 the first is faster at 1 token (4.60 against 4.79 ms per Llama-8B step), the second at
# 8 (5.29 against 5.90): `fused_kernel` picks by tokens. "lut3_gemvb*" (ballot) is lane with the warp's prefix
# count of escapes taken from votes on the counts' bits instead of a chain of shuffles (the same positions, so the
# same results bit for bit; on an H100 level with lane per matrix, 0.957x of it in the 8B model). Two more
# families, slower than lane in the whole 8B model on an H100 (0.970x and 0.890x, paired: docs/fused.md) and so not
# the default (lut3_kernel.cu says what they change; 84 and 72 registers, no spill): "lut3_gemvc*", the escape
# window fetched per warp one iteration ahead, and "lut3_gemvcp*", that plus an L2 prefetch of the bytes 4
# iterations ahead. CODECLLM_LUT3_KERNEL names a build, or a family (lane, ballot, chunk, prefetch) taken by the
# same token rule, for an A/B run of a whole model.
def _chosen(env: str, choices: tuple[str, ...]) -> str:
    """The choice an A/B run names in $env, else the first of `choices`."""
    name = os.environ.get(env, choices[0])
    if name not in choices:
        raise ValueError(f"{env}={name!r}: choose one of {', '.join(choices)}")
    return name


FUSED_KERNELS = tuple(f"lut3_{b}" for b in _BUILDS)
FAMILIES = {"lane": "lut3_gemv", "ballot": "lut3_gemvb", "chunk": "lut3_gemvc", "prefetch": "lut3_gemvcp"}
_FUSED_CHOICE = _chosen("CODECLLM_LUT3_KERNEL", ("auto", *FAMILIES, *FUSED_KERNELS))


KERNEL_CHOICES = ("auto", *FAMILIES)  # cache.kernel


def fused_kernel(tokens: int, family: str = "auto") -> str:
    """The build that multiplies `tokens` tokens: `family`'s (cache.kernel), or with "auto" what
    CODECLLM_LUT3_KERNEL names, else the lane family. Past MAX_TOKENS: the family's wide build where it has one
    (_WIDE_BUILDS), else lane's."""
    choice = _FUSED_CHOICE if family == "auto" else family
    base = choice if choice in FUSED_KERNELS else FAMILIES["lane" if choice == "auto" else choice]
    if tokens > MAX_TOKENS:
        wide = base.removesuffix("72")
        return wide if wide.removeprefix("lut3_") in _WIDE_BUILDS else "lut3_gemv"
    if choice in FUSED_KERNELS:
        return choice
    return base if tokens <= 2 else f"{base}72"


SMEM_PER_WARP_BYTES = 16 * 8 * 4  # lut3_kernel.cu's SMEM_PER_WARP: split-K partial sums of 8 tokens


def shared_bytes(name: str, warps: int) -> int:
    """A GEMV launch's dynamic shared memory: each warp's split-K partial sums, 16 rows x 8 tokens of fp32, times
    the wide builds' groups of 8 tokens (`name` ends in _m<tokens template>)."""
    groups = max(1, int(name.rsplit("_m", 1)[1]) // 8)
    return SMEM_PER_WARP_BYTES * groups * warps


def pdl_supported(device: torch.device) -> bool:
    """Programmatic dependent launch (cache.pdl) needs compute capability 9.0 (Hopper) or later."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)


def _prepared(name: str, tiles: int, warps: int, args: list, pdl: bool = False) -> Launch:
    # pdl: the GEMV and reference builds only, which wait for their input themselves (lut3_kernel.cu: pdl_wait);
    # the decode (Decode) does not, and is always launched plainly
    return Launch(kernels()[name], (tiles, 1, 1), (32 * warps, 1, 1), shared_bytes(name, warps), args, pdl=pdl)


def _launch(name: str, tiles: int, warps: int, args: list, pdl: bool = False) -> None:
    _prepared(name, tiles, warps, args, pdl)()


class Gemv:
    """The fused kernel for one matrix with its launches prepared (one per token template, built on first use):
    `Gemv(...)(x2d)` is `x2d @ W.T` for M <= 32 (past 8: the wide build) with a few microseconds of host time, for
    the eager paths that run per layer (a short prefill, in one launch or in 8-token slices; the eager runtime).
    `ptrs`: `addresses(p)`; `lut`: `p.lut_words()`; `counter`: the address of the int64 the kernel adds 1 to per
    launch; `pdl`: launched with programmatic dependent launch (cache.pdl)."""

    def __init__(self, ptrs: list[int], lut: list[int], n: int, k: int, counter: int, warps: int | None = None,
                 family: str = "auto", pdl: bool = False):  # fmt: skip
        self.n, self.k, self._warps, self._family, self._pdl = n, k, warps, family, pdl
        self.tiles, self.iters = -(-n // lut3.TILE_ROWS), k // lut3.ITER_K
        self._args = [PTR, INT, k, *ptrs, *lut, PTR, n, self.iters, ctypes.c_void_p(counter)]
        self._launches: dict[int, Launch] = {}

    def launch(self, m: int) -> Launch:
        t = _template(m)
        if t not in self._launches:
            warps = self._warps or warps_per_tile(self.tiles, self.iters, t)  # one count per template (see there)
            self._launches[t] = _prepared(f"{fused_kernel(t, self._family)}_m{t}", self.tiles, warps, self._args,
                                          self._pdl)  # fmt: skip
        return self._launches[t]

    def __call__(self, x2d: torch.Tensor) -> torch.Tensor:
        m = x2d.shape[0]
        y = torch.empty((m, self.n), dtype=torch.bfloat16, device=x2d.device)
        self.launch(m)(x2d, m, y)
        return y


def _gemv_launch(kernel: str, x2d, n: int, ptrs: list[int], lut: list[int], counter, warps=None, pdl=False):
    """The one launch of the fused kernel, shared by `gemv` and the op. `ptrs`: `addresses(p)`."""
    m, k = x2d.shape
    tiles, iters = -(-n // lut3.TILE_ROWS), k // lut3.ITER_K
    y = torch.empty((m, n), dtype=torch.bfloat16, device=x2d.device)
    _launch(f"{kernel}_m{_template(m)}", tiles, warps or warps_per_tile(tiles, iters, m),
            [x2d, m, k, *ptrs, *lut, y, n, iters, counter], pdl)  # fmt: skip
    return y


def gemv(
    x2d: torch.Tensor,
    p: lut3.Lut3,
    counter: torch.Tensor | None = None,
    warps: int | None = None,
    kernel: str | None = None,
    pdl: bool = False,
):
    """x2d @ W.T for M <= 32 tokens (past 8: the wide build), W decoded in registers. `counter` (int64, one
    element) counts launches. `kernel`: fused_kernel(M) unless named; "lut3_diag1" is the bench's diagnostic
    variant (escapes left undecoded: wrong results on purpose). `pdl`: programmatic dependent launch."""
    _check(x2d, p.shape[1])
    counter = counter if counter is not None else _scratch_counter(x2d.device)
    kernel = kernel or fused_kernel(x2d.shape[0])
    return _gemv_launch(kernel, x2d, p.shape[0], addresses(p), list(p.lut_words()), counter, warps, pdl)


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


def reference_gemv(x2d: torch.Tensor, ref: Reference, counter: torch.Tensor | None = None, warps: int | None = None,
                   pdl: bool = False):  # fmt: skip
    m, k = x2d.shape
    n = ref.shape[0]
    _check(x2d, k)
    y = torch.empty((m, n), dtype=torch.bfloat16, device=x2d.device)
    counter = counter if counter is not None else _scratch_counter(x2d.device)
    warps = warps or warps_per_tile(ref.tiles, ref.iters, m)
    _launch(f"lut3_ref_m{_template(m)}", ref.tiles, warps,
            [x2d, m, k, *address(ref.raw), y, n, ref.iters, counter], pdl)  # fmt: skip
    return y


DECODE_CHUNK = 4  # iterations per warp of lut3_decode
_DECODE_ROW_BYTES = 36 * 4  # lut3_kernel.cu's DECODE_ROW_WORDS: a staged row of 64 bf16, padded


class Decode:
    """The kernel's decode of one matrix with its launch prepared: `Decode(p)(out=None)` writes W row-major
    [N, K], bit for bit (the eager prefill's per-layer decode: a few microseconds of host time per call)."""

    def __init__(self, p: lut3.Lut3) -> None:
        n, k = p.shape
        self.shape, self.device = (n, k), p.device
        per_block = 4
        warps = p.tiles * -(-p.iters // DECODE_CHUNK)
        self._launch = Launch(kernels()["lut3_decode"], (-(-warps // per_block), 1, 1), (32 * per_block, 1, 1),
                              per_block * 16 * _DECODE_ROW_BYTES,
                              [*addresses(p), *p.lut_words(), PTR, n, k, p.tiles, p.iters, DECODE_CHUNK])  # fmt: skip

    def __call__(self, out: torch.Tensor | None = None) -> torch.Tensor:
        n, k = self.shape
        out = torch.empty((n, k), dtype=torch.bfloat16, device=self.device) if out is None else out
        if out.shape != (n, k) or out.dtype != torch.bfloat16 or not out.is_contiguous() or out.device != self.device:
            raise ValueError(f"decode_gpu: out must be a contiguous bf16 [{n}, {k}] on {self.device}")
        self._launch(out)
        return out


def decode_gpu(p: lut3.Lut3, out: torch.Tensor | None = None) -> torch.Tensor:
    """W as the kernel decodes it, written out row-major [N, K] by the kernel itself: must equal W bit for bit.
    `out`: a bf16 [N, K] buffer to write into (else a new one)."""
    return Decode(p)(out)


_COUNTERS: dict[torch.device, torch.Tensor] = {}


def _scratch_counter(device: torch.device) -> torch.Tensor:
    if device not in _COUNTERS:
        _COUNTERS[device] = torch.zeros(1, dtype=torch.int64, device=device)
    return _COUNTERS[device]


# ---- the op the fused policy calls: opaque to torch.compile, captured by CUDA graphs ----


@torch.library.custom_op("codecllm::lut3_linear", mutates_args=("counts",))
def lut3_linear(
    x2d: torch.Tensor, ptrs: list[int], lut: list[int], n: int, counts: torch.Tensor, slot: int, family: str = "auto",
    pdl: bool = False,
) -> torch.Tensor:
    """x2d @ W.T (W in lut3 at `ptrs` = addresses(p), M <= 32 tokens) by `family`'s build (`fused_kernel`); adds 1
    to counts.view(-1)[slot] on the device. The weights are addresses, not tensors: see `address`. `pdl`: launched
    with programmatic dependent launch (cache.pdl)."""
    return _gemv_launch(fused_kernel(x2d.shape[0], family), x2d, n, ptrs, lut, counts.view(-1)[slot:], pdl=pdl)


@lut3_linear.register_fake
def _lut3_linear_fake(x2d, ptrs, lut, n, counts, slot, family="auto", pdl=False):
    return x2d.new_empty((x2d.shape[0], n))
