"""Triton kernels for y = x @ W.T with W stored in the exp3 format, decoded in registers inside the matmul.

One program owns BLOCK_N output rows (and, with split-K, a slice of the k blocks). Per k block it loads the
compressed tile (signman [BLOCK_N, tk] bytes, code2 [BLOCK_N, tk/4], code1 [BLOCK_N, tk/8], 16-byte vector loads of
row segments), rebuilds the bf16 tile in registers, patches escapes inline (one offset per tile + an in-tile prefix
sum gives each escape its index in the side stream) and feeds it to tl.dot. The dense tile never touches global
memory, so HBM traffic is the compressed bytes plus x.

The reference variant is the same kernel with the decode replaced by a plain bf16 load (FUSED=False): same tile
shapes, same tl.dot sequence, same split and reduction order. Bit-identical outputs between the two prove that the
decoded tiles equal the original weights and that any difference from cuBLAS is arithmetic (reduction order), not
compression.

tl.dot is used even for one token (x padded to 16 columns): the tensor cores have ample spare throughput at batch 1,
and a dot's accumulation order does not depend on the register layout of its inputs, whereas an elementwise
multiply + tl.sum reduces in a layout-dependent order that could differ between the two variants.

Split-K is deterministic: partials go to an fp32 workspace [split, M, N] and a second kernel adds them in a fixed
order (no atomics).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from harness.fused.format import ROW_GROUP, Packed

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BLOCK_M = 16  # tl.dot needs >= 16 on every side; rows of x beyond M load as zeros


@triton.jit
def _decoded_tile(
    sm_ptr,
    c2_ptr,
    c1_ptr,
    esc_ptr,
    off_ptr,
    rows,
    kb,
    pid_n,
    Np,
    Kp,
    NG,
    base,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rmask = (rows < Np)[:, None]
    r = rows.to(tl.int64)[:, None]
    k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    sm = tl.load(sm_ptr + r * Kp + k[None, :], mask=rmask, other=0).to(tl.int32)
    k4 = kb * (BLOCK_K // 4) + tl.arange(0, BLOCK_K // 4)
    c2 = tl.load(c2_ptr + r * (Kp // 4) + k4[None, :], mask=rmask, other=0).to(tl.int32)
    k8 = kb * (BLOCK_K // 8) + tl.arange(0, BLOCK_K // 8)
    c1 = tl.load(c1_ptr + r * (Kp // 8) + k8[None, :], mask=rmask, other=0).to(tl.int32)
    # Unpack bytes to weights with joins (no gathers, no duplicated loads). A join adds a new LAST axis, so the
    # outermost join picks the lowest bit of the weight's index within the byte: joining (even fields, odd
    # fields), recursively, and reshaping gives weight 4j+q (8j+t) in natural k order.
    lo = tl.join(tl.join(c2 & 3, (c2 >> 4) & 3), tl.join((c2 >> 2) & 3, (c2 >> 6) & 3))
    lo = tl.reshape(lo, [BLOCK_N, BLOCK_K])
    hi = tl.join(
        tl.join(tl.join(c1 & 1, (c1 >> 4) & 1), tl.join((c1 >> 2) & 1, (c1 >> 6) & 1)),
        tl.join(tl.join((c1 >> 1) & 1, (c1 >> 5) & 1), tl.join((c1 >> 3) & 1, (c1 >> 7) & 1)),
    )
    code = lo | (tl.reshape(hi, [BLOCK_N, BLOCK_K]) << 2)
    # Escapes of this tile are contiguous in the stream in row-major tile order (format.py): rank = exclusive
    # prefix count over the flattened tile = earlier rows' totals + earlier columns in this row.
    is_esc = code == 7
    e = is_esc.to(tl.int32)
    row_total = tl.sum(e, axis=1)
    rank = (tl.cumsum(row_total, axis=0) - row_total)[:, None] + tl.cumsum(e, axis=1) - e
    first = tl.load(off_ptr + kb * NG + pid_n * (BLOCK_N // 16))
    true_exp = tl.load(esc_ptr + first + rank, mask=is_esc, other=0).to(tl.int32)
    exp = tl.where(is_esc, true_exp, code + base)
    bits = ((sm & 0x80) << 8) | (exp << 7) | (sm & 0x7F)
    return bits.to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _linear_kernel(
    x_ptr,
    w_ptr,
    sm_ptr,
    c2_ptr,
    c1_ptr,
    esc_ptr,
    off_ptr,
    y_ptr,
    ws_ptr,
    M,
    N,
    K,
    Np,
    Kp,
    NG,
    base,
    stride_xm,
    stride_wn,
    kb_per_split,
    FUSED: tl.constexpr,
    SPLIT: tl.constexpr,
    DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    kb0 = pid_k * kb_per_split
    for kb in range(kb0, kb0 + kb_per_split):
        k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        if FUSED:
            w = _decoded_tile(
                sm_ptr, c2_ptr, c1_ptr, esc_ptr, off_ptr, rows, kb, pid_n, Np, Kp, NG, base, BLOCK_N, BLOCK_K
            )
        else:
            w_ptrs = w_ptr + rows.to(tl.int64)[:, None] * stride_wn + k[None, :]
            w = tl.load(w_ptrs, mask=(rows < N)[:, None] & (k < K)[None, :], other=0.0)
        xt = tl.load(
            x_ptr + ms[None, :] * stride_xm + k[:, None], mask=(ms < M)[None, :] & (k < K)[:, None], other=0.0
        )  # [BLOCK_K, BLOCK_M]: x transposed, so W is the big (A) operand
        if DOT_F32:  # interpreter only: its bf16 tl.dot is wrong; bf16 products are exact in fp32 anyway
            acc = tl.dot(w.to(tl.float32), xt.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(w, xt, acc)
    out_mask = (rows < N)[:, None] & (ms < M)[None, :]
    if SPLIT == 1:
        tl.store(y_ptr + ms[None, :].to(tl.int64) * N + rows[:, None], acc.to(tl.bfloat16), mask=out_mask)
    else:
        ws_rows = (pid_k * M + ms[None, :]).to(tl.int64)
        tl.store(ws_ptr + ws_rows * N + rows[:, None], acc, mask=out_mask)


@triton.jit
def _split_reduce_kernel(ws_ptr, y_ptr, total, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in tl.static_range(SPLIT):  # fixed order: deterministic
        acc += tl.load(ws_ptr + s * total + offs, mask=mask, other=0.0)
    tl.store(y_ptr + offs, acc.to(tl.bfloat16), mask=mask)


@dataclass(frozen=True)
class Config:
    block_n: int = 32
    num_warps: int = 4
    split: int = 1
    num_stages: int = 2

    def __str__(self) -> str:
        return f"bn{self.block_n}_w{self.num_warps}_s{self.split}_st{self.num_stages}"


# A small explicit list (no @triton.autotune: it benchmarks on first call, which breaks CUDA-graph capture).
CONFIGS = [
    Config(bn, nw, sp, st)
    for bn in (16, 32, 64)
    for nw in (4, 8)
    for sp in (1, 2, 4, 8)
    for st in (2, 3)
    if not (bn == 16 and nw == 8)
]

_CHOSEN: dict[tuple, Config] = {}  # (fused, M, N, K, tk) -> Config, filled by tune() or set_config()


def heuristic_config(n: int, k: int, tk: int) -> Config:
    """Enough programs to fill 132 SMs about twice over; split-K only when rows alone cannot."""
    kb = triton.cdiv(k, tk)
    block_n = 32
    programs = triton.cdiv(n, block_n)
    split = 1
    while programs * split < 264 and split < 8 and kb % (split * 2) == 0:
        split *= 2
    return Config(block_n, 4, split, 2)


def valid(cfg: Config, n: int, k: int, tk: int) -> bool:
    return cfg.block_n % ROW_GROUP == 0 and triton.cdiv(k, tk) % cfg.split == 0


def config_for(fused: bool, m: int, n: int, k: int, tk: int) -> Config:
    return _CHOSEN.get((fused, m, n, k, tk)) or heuristic_config(n, k, tk)


def set_config(fused: bool, m: int, n: int, k: int, tk: int, cfg: Config) -> None:
    if not valid(cfg, n, k, tk):
        raise ValueError(f"{cfg} is not valid for N={n} K={k} tk={tk}")
    _CHOSEN[(fused, m, n, k, tk)] = cfg


def launch(x2d: torch.Tensor, w: torch.Tensor | None, p: Packed | None, tk: int, cfg: Config, wrap=lambda f: f):
    """Run one variant: FUSED when p is given (w ignored), the reference when w is given. wrap: wrap_triton."""
    m, k = x2d.shape
    fused = p is not None
    if fused:
        n = p.shape[0]
        np_, kp = p.signman.shape
        sm, c2, c1, esc, off, base = p.signman, p.code2, p.code1, p.esc, p.esc_off, p.base
        dummy = sm
        w_arg, stride_wn = dummy, 0
    else:
        n = w.shape[0]
        np_, kp = n, triton.cdiv(k, tk) * tk
        dummy = w
        sm = c2 = c1 = esc = off = dummy
        base, w_arg, stride_wn = 0, w, w.stride(0)
    kb = kp // tk
    if kb % cfg.split:
        raise ValueError(f"split {cfg.split} does not divide {kb} k blocks")
    y = torch.empty((m, n), dtype=torch.bfloat16, device=x2d.device)
    ws = torch.empty((cfg.split, m, n), dtype=torch.float32, device=x2d.device) if cfg.split > 1 else y
    grid = (triton.cdiv(n, cfg.block_n), cfg.split, triton.cdiv(m, BLOCK_M))
    wrap(_linear_kernel)[grid](
        x2d,
        w_arg,
        sm,
        c2,
        c1,
        esc,
        off,
        y,
        ws,
        m,
        n,
        k,
        np_,
        kp,
        np_ // ROW_GROUP if fused else 0,
        base,
        x2d.stride(0),
        stride_wn,
        kb // cfg.split,
        FUSED=fused,
        SPLIT=cfg.split,
        DOT_F32=INTERPRET,
        BLOCK_M=BLOCK_M,
        BLOCK_N=cfg.block_n,
        BLOCK_K=tk,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    if cfg.split > 1:
        total = m * n
        wrap(_split_reduce_kernel)[(triton.cdiv(total, 1024),)](ws, y, total, SPLIT=cfg.split, BLOCK=1024)
    return y


# ---------------------------------------------------------------- torch ops (torch.compile / CUDA graphs)


@torch.library.triton_op("codecllm::fused_linear", mutates_args=())
def _fused_linear_op(
    x: torch.Tensor,
    signman: torch.Tensor,
    code2: torch.Tensor,
    code1: torch.Tensor,
    esc: torch.Tensor,
    esc_off: torch.Tensor,
    base: int,
    n: int,
    k: int,
    tk: int,
) -> torch.Tensor:
    p = Packed(signman, code2, code1, esc, esc_off, base, (n, k), tk)
    cfg = config_for(True, x.shape[0], n, k, tk)
    return launch(x, None, p, tk, cfg, wrap=torch.library.wrap_triton)


@torch.library.triton_op("codecllm::reference_linear", mutates_args=())
def _reference_linear_op(x: torch.Tensor, w: torch.Tensor, tk: int) -> torch.Tensor:
    cfg = config_for(False, x.shape[0], w.shape[0], w.shape[1], tk)
    return launch(x, w, None, tk, cfg, wrap=torch.library.wrap_triton)


def _flat(x: torch.Tensor, k: int) -> torch.Tensor:
    if x.dtype != torch.bfloat16 or x.shape[-1] != k:
        raise ValueError(f"x must be bfloat16 [..., {k}], got {x.dtype} {tuple(x.shape)}")
    return x.reshape(-1, k).contiguous()


def fused_linear(x: torch.Tensor, p: Packed) -> torch.Tensor:
    """y = x @ W.T for x [..., K] bf16 and W packed (exp3); y [..., N] bf16, fp32 accumulation."""
    n, k = p.shape
    y = torch.ops.codecllm.fused_linear(_flat(x, k), p.signman, p.code2, p.code1, p.esc, p.esc_off, p.base, n, k, p.tk)
    return y.reshape(*x.shape[:-1], n)


def reference_linear(x: torch.Tensor, w: torch.Tensor, tk: int = 512) -> torch.Tensor:
    """The exactness reference: the same kernel reading raw bf16 W [N, K] (same tiles, same reduction order)."""
    n, k = w.shape
    y = torch.ops.codecllm.reference_linear(_flat(x, k), w.contiguous(), tk)
    return y.reshape(*x.shape[:-1], n)


def tune(x: torch.Tensor, p: Packed, w: torch.Tensor | None = None, configs=None, rep_ms: int = 20) -> dict:
    """Time every valid config for this shape (call before CUDA-graph capture); records and returns the timings."""
    x2d = _flat(x, p.shape[1])
    m, (n, k) = x2d.shape[0], p.shape
    timings = {}
    for fused, wt in ((True, None), (False, w)):
        if not fused and wt is None:
            continue
        best = None
        for cfg in configs or CONFIGS:
            if not valid(cfg, n, k, p.tk):
                continue
            fn = lambda c=cfg, f=fused, wt=wt: launch(x2d, wt, p if f else None, p.tk, c)  # noqa: E731
            us = triton.testing.do_bench(fn, warmup=5, rep=rep_ms) * 1e3
            timings[(fused, str(cfg))] = us
            if best is None or us < best[0]:
                best = (us, cfg)
        set_config(fused, m, n, k, p.tk, best[1])
    return timings
