"""Compress a model's selected linear layers in place and serve their weights through a cache policy.

(Past 300 lines: the runtime owns every decompression and its exact accounting, for all policies and both
placements; the policies, layers, embeddings and counters are already files of their own.)
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from harness.codecs.base import Codec, CompressedTensor, checksum
from harness.errors import HarnessError, IntegrityError
from harness.measure import forward_pass_hooks
from harness.runtime.embedding import CompressedEmbedding
from harness.runtime.layer import CompressedLinear
from harness.runtime.policy import CachePolicy, make_policy
from harness.runtime.stats import Stats
from harness.selection import Selection, conv1d_type, select_layers

VERIFY_MODES = ("first", "always", "never")


@dataclass
class CompressionReport:
    layers_compressed: int
    layers_total: int
    original_bytes: int
    compressed_bytes: int
    compress_time_s: float
    skipped: dict[str, str] = field(default_factory=dict)
    # Set by harness.artifacts.compress_cached: None when no artifact cache was used.
    artifact_cache_hit: bool | None = None
    artifact_path: str | None = None
    artifact_time_s: float = 0.0  # hashing the weights + reading or writing the artifact (part of compress_time_s)

    @property
    def compression_ratio(self) -> float:
        return self.original_bytes / self.compressed_bytes if self.compressed_bytes else 1.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "layers_compressed": self.layers_compressed,
            "layers_total": self.layers_total,
            "original_bytes": self.original_bytes,
            "compressed_bytes": self.compressed_bytes,
            "compression_ratio": self.compression_ratio,
            "compress_time_s": self.compress_time_s,
            "skipped_layers": self.skipped,
            "artifact_cache_hit": self.artifact_cache_hit,
            "artifact_path": self.artifact_path,
            "artifact_time_s": self.artifact_time_s,
        }


class CompressedRuntime:
    """Owns the compressed layers, the codec, the cache policy and the counters of one compressed model."""

    def __init__(self, codec: Codec, verify: str = "first", device: torch.device | str = "cpu") -> None:
        if verify not in VERIFY_MODES:
            raise HarnessError(f"compress.verify={verify!r} is invalid; valid: {', '.join(VERIFY_MODES)}")
        self.codec = codec
        self.verify = verify
        self.device = torch.device(device)  # where the model computes (the dense weights were)
        self.layers: list[CompressedLinear | CompressedEmbedding] = []  # index = position here
        self.stats = Stats()
        self.policy: CachePolicy | None = None
        self.report: CompressionReport | None = None
        self._verified: set[int] = set()
        self._hooks: list[Any] = []

    # -- the two operations every policy is built from ------------------------------------------------------
    def decompress(
        self,
        layer: CompressedLinear,
        device: torch.device,
        out: torch.Tensor | None = None,
        decode: Callable[[], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The layer's dense weight on `device`, written into `out` when given (a scratch-buffer view).
        `decode`: the policy's own prepared decode of this layer on `device` (cache=fused keeps one per layer, so
        that an eager prefill does not rebuild the codec's views and launch per layer), else the codec's."""
        start = time.perf_counter()
        ct = layer.ct
        with self._corruption_named(layer.name):
            if decode is not None:
                w = decode()
            elif self.codec.decode_device == "cpu" and device.type == "cuda":
                # CPU codec feeding a GPU: decode into pinned staging (torch's caching host allocator reuses it
                # once the copy that reads it has finished), then an async host-to-device copy.
                staging = torch.empty(ct.shape, dtype=ct.torch_dtype, pin_memory=True)
                w = self.codec.decode(ct, out=staging)
            else:
                w = self.codec.decode(ct, out=out)
        self._verify(layer, w)
        if w.device != device or (out is not None and w is not out):
            w = out.copy_(w, non_blocking=True) if out is not None else w.to(device, non_blocking=True)
        # On CUDA this is the host time to issue the work; the GPU side overlaps (see docs/benchmarks.md).
        self.stats.count_decompression(layer.name, layer.weight_nbytes, time.perf_counter() - start)
        self.stats.hold(layer.weight_nbytes)
        return w

    def decompress_many(
        self, layers: list[CompressedLinear], device: torch.device, outs: list[torch.Tensor], key: Any = None
    ) -> list[torch.Tensor]:
        """Several layers at once: one batched call when the codec has one and the bytes sit on `device`
        (or the codec stages host bytes itself). Called once per block per pass: kept lean on host time.
        `key` names this (layers, outputs) combination for the codec's prepared-call cache."""
        if not (self.codec.stages_host_payloads or all(layer.ct.payload.device == device for layer in layers)):
            # host bytes for a codec that does not stage them itself: per layer, through pinned staging
            return [self.decompress(layer, device, out) for layer, out in zip(layers, outs, strict=True)]
        start = time.perf_counter()
        with self._corruption_named(layers):
            self.codec.decode_many([layer.ct for layer in layers], outs, key=key)
        self.verify_group(layers, outs)
        self.stats.count_many(layers, time.perf_counter() - start)
        return outs

    def verify_group(self, layers: list[CompressedLinear], weights: list[torch.Tensor]) -> None:
        """Checksum the decoded weights of layers that need it (all with verify=always, unverified ones with first)."""
        if self.verify == "always" or (self.verify == "first" and not self._verified.issuperset(layer.index for layer in layers)):
            for layer, w in zip(layers, weights, strict=True):
                self._verify(layer, w)

    def embed(self, layer: CompressedEmbedding, ids: torch.Tensor) -> torch.Tensor:
        """An embedding lookup: the chunks holding the looked-up rows only, where the codec can
        (`decode_rows(ct, ids) -> (rows, bytes decoded)`) and the bytes sit on the ids' device; else the whole
        table, decoded, indexed and dropped. One counted decompression either way.
        The first lookup (verify=first) and every lookup (verify=always) decode the whole table, to verify it."""
        device = ids.device
        if self.needs_verify(layer) or layer.ct.payload.device != device:
            w = self.decompress(layer, device)
            try:
                return F.embedding(ids, w, layer.padding_idx)
            finally:
                self.drop(layer)
        start = time.perf_counter()
        with self._corruption_named(layer.name):
            rows, decoded_nbytes = self.codec.decode_rows(layer.ct, ids)
        self.stats.count_decompression(layer.name, decoded_nbytes, time.perf_counter() - start)
        self.stats.hold(decoded_nbytes)  # alive only during the lookup, but part of the peak
        self.stats.unhold(decoded_nbytes)
        return rows

    def needs_verify(self, layer: CompressedLinear | CompressedEmbedding) -> bool:
        return self.verify == "always" or (self.verify == "first" and layer.index not in self._verified)

    @property
    def embedding_layers(self) -> list[CompressedEmbedding]:
        return [layer for layer in self.layers if isinstance(layer, CompressedEmbedding)]

    @property
    def linear_layers(self) -> list[CompressedLinear]:
        """The layers the cache policies schedule (embedding lookups bypass them)."""
        return [layer for layer in self.layers if isinstance(layer, CompressedLinear)]

    @contextmanager
    def _corruption_named(self, what: str | list[CompressedLinear]):
        try:
            yield
        except (MemoryError, torch.OutOfMemoryError):
            raise
        except Exception as e:  # a codec that cannot parse its own bytes: corruption, not a user error
            names = what if isinstance(what, str) else ", ".join(layer.name for layer in what)
            raise IntegrityError(f"layer {names}: cannot decompress its weight ({e}); the compressed bytes are corrupted") from e

    def _verify(self, layer: CompressedLinear, w: torch.Tensor) -> None:
        if self.verify == "always" or (self.verify == "first" and layer.index not in self._verified):
            if checksum(w) != layer.ct.checksum:
                raise IntegrityError(
                    f"layer {layer.name}: decompressed weight fails its checksum; the compressed bytes are corrupted"
                )
            self._verified.add(layer.index)
            self.stats.verifications += 1

    def verify_decodes(self, layers: list[CompressedLinear | CompressedEmbedding]) -> None:
        """Decode each layer that needs verifying once, outside any pass, and check it against its original's
        checksum: for a policy whose forward never decodes a weight (cache=fused's kernel), this is the check
        that verify=first otherwise makes at each layer's first decode. Nothing is counted as a decompression."""
        for layer in layers:
            if self.needs_verify(layer):
                with self._corruption_named(layer.name):
                    w = self.codec.decode(layer.ct)
                self._verify(layer, w)
                del w  # one layer's dense weight alive at a time

    def lossless(self) -> dict[str, Any]:
        """What this run has shown about the weights: `weights_lossless` is True once every compressed layer's
        decoded weight has matched its original's checksum (xxh3-64 of the original bits, taken before
        compression; a mismatch fails the run), None while some layer is unchecked (verify=never) or nothing is
        compressed; `weights_checked_layers` counts the layers checked."""
        checked = len(self._verified)
        return {"weights_lossless": True if self.layers and checked == len(self.layers) else None,
                "weights_checked_layers": checked}

    def drop(self, layer: CompressedLinear) -> None:
        self.stats.unhold(layer.weight_nbytes)

    # -- forward-pass boundaries ------------------------------------------------------------------------------
    def begin_pass(self) -> None:
        self.stats.begin_pass()
        self.policy.begin_pass()

    def end_pass(self) -> None:
        self.policy.end_pass()

    def end_generation(self) -> None:
        """Drop every cached weight (each generation starts cold, so repeats count the same)."""
        self.policy.clear()

    def attach(self, model: nn.Module) -> None:
        """Count forward passes with hooks on the top-level model (for use outside a Lightning phase).
        The hooks are host logic: under torch.compile they run eagerly between graphs."""
        self._hooks += forward_pass_hooks(model, self.begin_pass, self.end_pass)

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def set_policy(self, policy: str | Callable[..., CachePolicy], captured: bool = False, **options: Any) -> None:
        """Serve weights through `policy`: a registered name, or a partial of make_policy (the instantiated
        `cache` config) called with this runtime. `captured` picks its capturable form (generate.compile=true)."""
        if self.policy is not None:
            self.policy.close()
        if captured and self.verify == "always":
            raise HarnessError("compress.verify=always cannot run inside a CUDA graph; use verify=first with generate.compile=true")
        build = policy if callable(policy) else functools.partial(make_policy, name=policy)
        self.policy = build(self, captured=captured, **options)

    def reset_stats(self) -> None:
        self.stats.reset()

    def close(self) -> None:
        if self.policy is not None:
            self.policy.close()
        self.codec.close()
        self.detach()

    def layer_table(self) -> list[dict[str, Any]]:
        per_layer = self.stats.decompressions_per_layer
        return [
            {
                "name": layer.name,
                "shape": list(layer.ct.shape),
                "dtype": layer.ct.dtype,
                "original_bytes": layer.ct.original_nbytes,
                "compressed_bytes": layer.ct.compressed_nbytes,
                "ratio": layer.ct.ratio,
                "decompressions": per_layer.get(layer.name, 0),
            }
            for layer in self.layers
        ]


PLACEMENTS = ("cpu", "gpu")


def check_placement(placement: str, codec: Codec) -> None:
    if placement not in PLACEMENTS:
        raise HarnessError(f"compress.placement={placement!r} is invalid; valid: {', '.join(PLACEMENTS)}")
    if placement == "gpu" and codec.decode_device != "cuda":
        raise HarnessError(f"compress.placement=gpu needs a GPU codec (nvcomp_ans), not {codec.name}; or use placement=cpu")


def _place(payload: torch.Tensor, placement: str, weight_device: torch.device) -> torch.Tensor:
    """Compressed bytes live in host memory (pinned when CUDA is present, for async copies) or in VRAM."""
    if placement == "gpu":
        return payload.to(weight_device)
    if payload.device.type != "cpu":
        payload = payload.cpu()
    if torch.cuda.is_available() and not payload.is_pinned():
        payload = payload.pin_memory()
    return payload


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def compress_model(
    model: nn.Module,
    codec: Codec,
    selection: Selection | None = None,
    policy: str | Callable[..., CachePolicy] = "per_forward_pass",
    policy_options: dict[str, Any] | None = None,
    verify: str = "first",
    attach: bool = True,
    progress: bool = True,
    placement: str = "cpu",
    precompressed: Mapping[str, CompressedTensor] | None = None,
    captured: bool = False,
    **select_kwargs: Any,
) -> CompressedRuntime:
    """Swap the selected linear layers of `model` (in place) for CompressedLinear and return their runtime.

    The dense weights are released: after this the model holds only the compressed bytes of those layers.
    `select_kwargs` (layers, order, include, exclude) are passed to `select_layers` when no selection is given.
    `precompressed` (layer name -> CompressedTensor, from harness.artifacts) replaces encoding those layers.
    `captured` serves the weights through the policy's capturable form (generate.compile=true).
    """
    check_placement(placement, codec)
    if selection is None:
        selection = select_layers(model, refuse=codec.refuse, **select_kwargs)
    device = next((cand.module.weight.device for cand in selection.chosen), torch.device("cpu"))
    runtime = CompressedRuntime(codec, verify=verify, device=device)
    conv1d = conv1d_type() or type(None)

    original = compressed = 0
    start = time.perf_counter()
    candidates: Iterable = selection.chosen
    if progress and selection.chosen and precompressed is None:
        candidates = tqdm(selection.chosen, desc=f"compressing ({codec.name})", unit="layer", leave=False)
    for cand in candidates:
        module = cand.module
        if precompressed is not None:
            ct = precompressed[cand.name]
        else:
            with torch.no_grad():
                ct = codec.encode(module.weight.detach())
        ct.payload = _place(ct.payload, placement, module.weight.device)
        if isinstance(module, nn.Embedding):
            layer = CompressedEmbedding(cand.name, ct, module.padding_idx, runtime)
        else:
            layer = CompressedLinear(cand.name, ct, module.bias, runtime, transposed=isinstance(module, conv1d))
        layer.index = len(runtime.layers)
        runtime.layers.append(layer)
        _replace(model, cand.name, layer)
        module.weight = None  # release the dense weight now, even if someone still holds the old module
        original += ct.original_nbytes
        compressed += ct.compressed_nbytes
    runtime.report = CompressionReport(
        layers_compressed=len(runtime.layers),
        layers_total=selection.total,
        original_bytes=original,
        compressed_bytes=compressed,
        compress_time_s=time.perf_counter() - start,
        skipped=selection.skipped,
    )
    runtime.set_policy(policy, captured=captured, **(policy_options or {}))
    if attach:
        runtime.attach(model)
    return runtime
