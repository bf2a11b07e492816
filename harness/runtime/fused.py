"""`cache=fused`: the layer's matmul runs in lut3's kernel, which decodes the weight in registers (issue 12).

With at most `lut3_cuda.MAX_TOKENS` tokens on CUDA (a decode step at batch <= 8), a compressed layer's forward is
one call of the opaque op `codecllm::lut3_linear` on the compressed bytes in VRAM: no dense weight exists at any
point. With `prefill_tokens=P` (up to 32, the default), a forward of up to P tokens (a short prompt's prefill) is
one launch of the kernel's wide build, which reads and decodes the weight once for all of them; with
`prefill_slices=S` (and prefill_tokens=0), up to 8 x S tokens go through the decode-step kernel 8 tokens a
launch. Otherwise (a prefill with more tokens, or the CPU) the weight is decoded (on CUDA by the kernel's own
decode, lut3_cuda.decode_gpu; on the CPU by lut3.decode) and multiplied by F.linear: ordinary, counted
decompressions. Eager, both routes launch from arguments the policy prepared once per layer (lut3_cuda.Gemv,
lut3_cuda.Decode), because an eager prefill pays the host cost of every layer's launch.

Counters. Each kernel launch adds 1 to its layer's slot of a device tensor (inside a CUDA graph too), so
`in_kernel_decodes` per pass and per layer stay exact under replay; the host reads them once per generation
(captured.py's pattern), and tiles decoded = launches x the layer's 16-row tiles. Decodes inside a compiled step
(more tokens than the kernel takes) are counted on the device too; eager ones on the host, with their time.

The same class serves generate.compile=true: everything its forward calls on a traced path is an opaque op that
CUDA graphs capture. `reference()` switches every layer to the same kernel fed the uncompressed weight (the
exactness reference of harness.exactness).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from harness.codecs.base import checksum
from harness.errors import HarnessError, IntegrityError
from harness.fused import lut3, lut3_cuda
from harness.runtime.policy import CAPTURED_POLICIES, POLICIES, CachePolicy

if TYPE_CHECKING:
    from harness.runtime.compress import CompressedRuntime
    from harness.runtime.layer import CompressedLinear

CODEC = "fused_lut3"
DECODES, BYTES, IN_KERNEL = 0, 1, 2  # rows of the device counts [3, layers]


def check_setup(codec: str, placement: str, device: torch.device, embeddings: bool) -> None:
    """What cache=fused can run with, checked from the config alone (checks.validate, before the model loads);
    the policy's constructor checks the same on the compressed layers."""
    if codec != CODEC:
        raise HarnessError(f"cache=fused multiplies lut3 weights in its kernel: it needs compress.codec={CODEC}, "
                           f"not {codec}")  # fmt: skip
    if embeddings:
        raise HarnessError("cache=fused serves linear layers only; use compress.embeddings=false")
    if device.type == "cuda" and placement != "gpu":
        raise HarnessError("cache=fused on CUDA reads the compressed bytes from VRAM: use compress.placement=gpu")


def check_kernel(kernel: str) -> None:
    """cache.kernel: the fused kernel's family (harness/fused/lut3_kernel.cu), checked from the config alone."""
    if kernel not in lut3_cuda.KERNEL_CHOICES:
        raise HarnessError(f"cache.kernel={kernel!r} is invalid; valid: {', '.join(lut3_cuda.KERNEL_CHOICES)} "
                           "(auto: the default family)")  # fmt: skip


# The default route of a short prefill (cache.prefill_tokens): one launch of the wide build per layer for a forward of
# up to 32 tokens. Paired against the decode route (0) it was faster at both shapes on an H100 (8B b=1: 1.024x,
# 1B b=1: 1.064x) with logits equal to its own reference (docs/fused.md).
PREFILL_TOKENS = lut3_cuda.WIDE_TOKENS  # 32
# cache.pdl's default: plain launches. Programmatic dependent launch saved ~2 us a launch back to back, but gained
# nothing measurable in the whole 8B model on an H100 (1.012x and 0.993x of plain, paired: docs/fused.md)
PDL = False


def check_prefill(prefill_slices: object, prefill_tokens: object) -> None:
    """cache.prefill_slices and cache.prefill_tokens: two ways to run a short prefill in the kernel; one at a time."""
    if isinstance(prefill_slices, bool) or not isinstance(prefill_slices, int) or not 0 <= prefill_slices <= 64:
        raise HarnessError(f"cache.prefill_slices={prefill_slices!r} is invalid; give 0 (decode + F.linear) to 64 "
                           "(prompts of up to 64 x 8 tokens through the kernel, 8 tokens a launch)")  # fmt: skip
    wide = lut3_cuda.WIDE_TOKENS
    if isinstance(prefill_tokens, bool) or not isinstance(prefill_tokens, int) or not 0 <= prefill_tokens <= wide:
        raise HarnessError(f"cache.prefill_tokens={prefill_tokens!r} is invalid; give 0 (off) to {wide} (a forward of "
                           f"up to that many tokens in one launch of the kernel's wide build)")  # fmt: skip
    if prefill_slices and prefill_tokens:
        raise HarnessError(f"cache.prefill_slices={prefill_slices} and cache.prefill_tokens={prefill_tokens} both "
                           f"route a prefill through the kernel; to slice, also give cache.prefill_tokens=0 (its "
                           f"default is {PREFILL_TOKENS})")  # fmt: skip


def check_pdl(pdl: object) -> None:
    """cache.pdl: launch the kernel with programmatic dependent launch (a boolean)."""
    if not isinstance(pdl, bool):
        raise HarnessError(f"cache.pdl={pdl!r} is invalid; give true (each kernel launch may start while the kernel "
                           "before it finishes; compute capability 9.0+) or false")  # fmt: skip


def refuse_transposed(names: list[str]) -> None:
    """The kernel computes x @ W.T from W as stored; a Conv1D (GPT-2) stores W.T."""
    if names:
        raise HarnessError(f"cache=fused needs nn.Linear weights; {names[0]} is a transposed Conv1D (GPT-2 family): "
                           "use another cache policy for this model")  # fmt: skip


# ---- ops: opaque to torch.compile, captured by CUDA graphs -----------------------------------------------------


@torch.library.custom_op("codecllm::lut3_dense", mutates_args=("counts",))
def lut3_dense(
    signman: torch.Tensor,
    codes: torch.Tensor,
    esc_exp: torch.Tensor,
    esc_off: torch.Tensor,
    exponents: list[int],
    n: int,
    k: int,
    counts: torch.Tensor,
    index: int,
    nbytes: int,
) -> torch.Tensor:
    """The dense weight of a lut3 layer, inside a compiled step (more tokens than the kernel takes): one decode
    and its bytes added to `counts` (decodes at [0, index], bytes at [1, index])."""
    p = lut3.Lut3((n, k), signman, codes, esc_exp, esc_off, tuple(exponents))
    w = lut3_cuda.decode_gpu(p) if signman.is_cuda else lut3.decode(p)
    counts[DECODES, index].add_(1)  # scalar adds: kernels with the value as an argument, so a graph replays them
    counts[BYTES, index].add_(nbytes)
    return w


@lut3_dense.register_fake
def _lut3_dense_fake(signman, codes, esc_exp, esc_off, exponents, n, k, counts, index, nbytes):
    return signman.new_empty((n, k), dtype=torch.bfloat16)


@torch.library.custom_op("codecllm::lut3_reference_linear", mutates_args=("counter",))
def lut3_reference_linear(x2d: torch.Tensor, raw: list[int], n: int, iters: int, counter: torch.Tensor,
                          pdl: bool = False) -> torch.Tensor:  # fmt: skip
    """x2d @ W.T by the lut3 kernel fed the uncompressed W (lut3_cuda.reference_gemv; `raw`: the address of W in
    the kernel's stream order), as an op like lut3_linear, so that torch.compile treats the reference run exactly
    as the compressed one. `counter`: a launch count, given so that no scratch tensor is created inside a capture."""
    m = x2d.shape[0]
    tiles = -(-n // lut3.TILE_ROWS)
    y = torch.empty((m, n), dtype=torch.bfloat16, device=x2d.device)
    lut3_cuda._launch(f"lut3_ref_m{lut3_cuda._template(m)}", tiles, lut3_cuda.warps_per_tile(tiles, iters, m),
                      [x2d, m, x2d.shape[1], *raw, y, n, iters, counter], pdl)  # fmt: skip
    return y


@lut3_reference_linear.register_fake
def _lut3_reference_linear_fake(x2d, raw, n, iters, counter, pdl=False):
    return x2d.new_empty((x2d.shape[0], n))


# ---- the policy ------------------------------------------------------------------------------------------------


def _static(*tensors: torch.Tensor) -> None:
    # CUDA-graph trees copy a non-static input into the graph's own buffer at every replay: these never move.
    for t in tensors:
        torch._dynamo.mark_static_address(t)


class Fused(CachePolicy):
    """The compressed weight multiplied in the kernel that decodes it (see the module docstring)."""

    name = "fused"
    computes_linear = True

    def __init__(self, runtime: CompressedRuntime, prefill_slices: int = 0, kernel: str = "auto",
                 prefill_tokens: int = PREFILL_TOKENS, pdl: bool = PDL) -> None:  # fmt: skip
        check_prefill(prefill_slices, prefill_tokens)
        check_kernel(kernel)
        check_pdl(pdl)
        super().__init__(runtime)
        self.kernel = kernel  # the fused kernel's family (lut3_cuda.fused_kernel): one policy, one family
        # Programmatic dependent launch where the GPU has it (below 9.0 the launches are plain ones, as with false):
        # it changes when a launch starts, never what it computes, so the reference takes the same setting.
        self.pdl = pdl and lut3_cuda.pdl_supported(runtime.device)
        # The most tokens a forward multiplies in the kernel: a decode step's 8, or with prefill_slices a prefill of
        # up to 8 x prefill_slices, 8 tokens a launch, instead of decoding every layer for cuBLAS: each launch reads
        # only the compressed bytes, and the eager decode's per-layer host work (the 8B prefill's cost:
        # docs/fused.md) is replaced by a few op calls.
        self._kernel_tokens = max(lut3_cuda.MAX_TOKENS * max(1, prefill_slices), prefill_tokens)
        self._per_launch = max(lut3_cuda.MAX_TOKENS, prefill_tokens)  # tokens one launch takes
        device, linear = runtime.device, runtime.linear_layers
        placement = "gpu" if all(layer.ct.payload.device == device for layer in linear) else "cpu"
        check_setup(runtime.codec.name, placement, device, bool(runtime.embedding_layers))
        refuse_transposed([layer.name for layer in linear if layer.transposed])
        n = len(runtime.layers)
        self._packed: dict[int, lut3.Lut3] = {}  # views of the payloads: they keep the addresses below valid
        self._ptrs: dict[int, list[int]] = {}  # the parts' addresses (constants in a traced graph, like the tables)
        self._lut: dict[int, list[int]] = {}  # the kernel's PRMT tables (baked into a traced graph as constants)
        self._slot: dict[int, int] = {}  # where the layer's launches count in the flattened device counts
        self._counts = torch.zeros((3, n), dtype=torch.int64, device=device)  # [decodes, bytes, in-kernel]
        self._ref_counter = torch.zeros(1, dtype=torch.int64, device=device)
        _static(self._counts, self._ref_counter)
        # Eager calls (a prefill: one per layer) go straight to launches prepared here, not through the op or the
        # codec: the op's dispatch and the codec's per-call views and launch cost the host ~100 us a layer.
        self._gemv: dict[int, lut3_cuda.Gemv] = {}
        self._decode: dict[int, lut3_cuda.Decode] = {}
        for layer in linear:
            p = self._packed[layer.index] = runtime.codec.packed(layer.ct)
            self._lut[layer.index] = list(p.lut_words())
            self._slot[layer.index] = slot = IN_KERNEL * n + layer.index
            if p.signman.is_cuda:
                self._ptrs[layer.index] = lut3_cuda.addresses(p)
                counter = self._counts.data_ptr() + slot * self._counts.element_size()
                self._gemv[layer.index] = lut3_cuda.Gemv(self._ptrs[layer.index], self._lut[layer.index], *p.shape,
                                                         counter, family=kernel, pdl=self.pdl)  # fmt: skip
                self._decode[layer.index] = lut3_cuda.Decode(p)
        self._tiles = [-(-layer.ct.shape[0] // lut3.TILE_ROWS) if layer.index in self._packed else 0
                       for layer in runtime.layers]  # fmt: skip
        self._snapshots: list[torch.Tensor] = []  # counts at the start of each pass of this generation
        self._reference: dict[int, lut3_cuda.Reference] | None = None
        self._ref_ptrs: dict[int, list[int]] = {}
        # The kernel never writes a weight out, so no forward would check one: check every layer's decode now
        # (the kernel's own decode on CUDA), as verify=first checks other policies' first decodes.
        runtime.verify_decodes(linear)

    # -- the forward path ------------------------------------------------------------------------------------------
    def linear(self, layer: CompressedLinear, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, x.shape[-1])
        m, per = x2d.shape[0], self._per_launch
        if x.is_cuda and m <= self._kernel_tokens:
            x2d = x2d.contiguous()
            n = layer.out_features
            parts = [self._in_kernel(layer, x2d[i : i + per], n) for i in range(0, m, per)]
            y = parts[0] if len(parts) == 1 else torch.cat(parts)
            y = y.view(*x.shape[:-1], n)
            return y if layer.bias is None else y + layer.bias
        # More tokens than the kernel takes, or the CPU: decode, then the ordinary matmul.
        if self._reference is not None:
            return F.linear(x, self._reference_weight(layer), layer.bias)
        if torch.compiler.is_compiling():
            p = self._packed[layer.index]
            w = torch.ops.codecllm.lut3_dense(p.signman, p.codes, p.esc_exp, p.esc_off, list(p.exponents), *p.shape,
                                              self._counts, layer.index, layer.weight_nbytes)  # fmt: skip
            return F.linear(x, w, layer.bias)
        w = self.runtime.decompress(layer, x.device, decode=self._decode.get(layer.index) if x.is_cuda else None)
        try:
            return F.linear(x, w, layer.bias)
        finally:
            self.runtime.drop(layer)

    def _in_kernel(self, layer: CompressedLinear, x2d: torch.Tensor, n: int) -> torch.Tensor:
        """One launch, at most 8 tokens: the fused kernel, or inside reference() the same kernel fed W."""
        if self._reference is not None:
            ref = self._reference[layer.index]
            return torch.ops.codecllm.lut3_reference_linear(x2d, self._ref_ptrs[layer.index], n, ref.iters,
                                                            self._ref_counter, self.pdl)  # fmt: skip
        if not torch.compiler.is_compiling():  # eager: the same launch as the op's, prepared (see __init__)
            return self._gemv[layer.index](x2d)
        return torch.ops.codecllm.lut3_linear(x2d, self._ptrs[layer.index], self._lut[layer.index], n, self._counts,
                                              self._slot[layer.index], self.kernel, self.pdl)  # fmt: skip

    # -- pass boundaries (Python, between graph replays) --------------------------------------------------------
    def begin_pass(self) -> None:
        if self._reference is None:  # the reference counts nothing: no marks for the next generation to misread
            self._snapshots.append(self._counts.clone())

    def clear(self) -> None:
        """End of a generation: read the device counters once (one sync) into the phase's exact counts."""
        if not self._snapshots:
            return
        marks = torch.stack([*self._snapshots, self._counts]).cpu()  # [passes + 1, 3, layers]
        self._snapshots = []
        per_pass = marks[1:] - marks[:-1]
        stats, layers = self.runtime.stats, self.runtime.layers
        if per_pass[:, DECODES].any():  # decodes inside compiled steps: exact counts, no host time
            stats.add_passes(per_pass[:, DECODES].tolist(), per_pass[:, BYTES].tolist(), layers)
            largest = max(layer.weight_nbytes for layer in layers)
            stats.hold(largest)  # one layer's weight was alive at a time (the op's output, freed after its matmul)
            stats.unhold(largest)
        stats.add_in_kernel(per_pass[:, IN_KERNEL].tolist(), layers, self._tiles)

    def close(self) -> None:
        self.clear()
        self._packed, self._ptrs, self._lut, self._slot, self._reference = {}, {}, {}, {}, None
        self._gemv, self._decode = {}, {}

    # -- the exactness reference -----------------------------------------------------------------------------------
    @contextmanager
    def reference(self) -> Iterator[None]:
        """Inside: every layer computed by the same kernel fed the uncompressed weight (lut3_cuda.reference_gemv on
        reference_inputs(W)), or by F.linear on W where the compressed path decodes. W is the decoded weight,
        checked against the original's checksum here. Nothing is counted."""
        refs: dict[int, lut3_cuda.Reference] = {}
        for layer in self.runtime.linear_layers:
            w = self.runtime.codec.decode(layer.ct)
            if checksum(w) != layer.ct.checksum:
                raise IntegrityError(f"layer {layer.name}: decoded weight fails its checksum; no exactness reference")
            refs[layer.index] = lut3_cuda.reference_inputs(w)
            del w
        self._reference = refs
        self._ref_ptrs = {index: lut3_cuda.address(ref.raw) for index, ref in refs.items() if ref.raw.is_cuda}
        try:
            yield
        finally:
            self._reference, self._ref_ptrs = None, {}

    def _reference_weight(self, layer: CompressedLinear) -> torch.Tensor:
        """W from the reference's raw stream (un-permuted: the reference holds no second dense copy)."""
        ref = self._reference[layer.index]
        bits = lut3._unstream(ref.raw.view(ref.tiles, ref.iters, 32, 32), ref.tiles, ref.iters)
        return bits[: ref.shape[0]].contiguous().view(torch.bfloat16)


POLICIES.register("fused")(Fused)
CAPTURED_POLICIES.register("fused")(Fused)  # the same class: its traced path is opaque ops only
