"""The codec interface: a lossless tensor <-> bytes transform with a registry.

A codec turns a weight tensor into a `CompressedTensor` (payload bytes + the metadata needed to rebuild it
bit for bit) and back. Codecs are stateless apart from their settings, so one instance can serve many layers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import xxhash

from harness.errors import HarnessError
from harness.registry import Registry

CODECS: Registry[type[Codec]] = Registry("codec")

DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def raw_bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as a flat uint8 CPU tensor (contiguous, row-major)."""
    return t.detach().contiguous().cpu().view(-1).view(torch.uint8)


def cuda_source(t: torch.Tensor, codec: str, data_types: dict[torch.dtype, Any]) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """For a GPU codec's encode: the dtype's codec data type, the tensor contiguous on CUDA, and its flat bytes."""
    data_type = data_types.get(t.dtype)
    if data_type is None:
        raise HarnessError(f"codec {codec} supports bfloat16, float16 and float32, not {t.dtype}")
    src = t.detach().contiguous()
    if src.device.type != "cuda":
        src = src.cuda()
    return data_type, src, src.view(-1).view(torch.uint8)


def cpu_output(ct: CompressedTensor, out: torch.Tensor | None) -> torch.Tensor:
    """Where a CPU codec decodes to: `out` when given (checked: a contiguous CPU tensor of the right shape and
    dtype), else a new tensor."""
    if out is None:
        return torch.empty(ct.shape, dtype=ct.torch_dtype)
    if (
        out.dtype != ct.torch_dtype
        or tuple(out.shape) != tuple(ct.shape)
        or out.device.type != "cpu"
        or not out.is_contiguous()
    ):
        raise ValueError(
            f"out must be a contiguous CPU tensor of shape {tuple(ct.shape)} and dtype {ct.dtype}; "
            f"got {tuple(out.shape)} {out.dtype} on {out.device}"
        )
    return out


def checksum(t: torch.Tensor) -> str:
    """xxh3-64 of the tensor's raw bytes (hex): identifies the exact original bits."""
    return xxhash.xxh3_64_hexdigest(raw_bytes(t).numpy())


@dataclass
class CompressedTensor:
    """One compressed weight: payload bytes plus everything needed to rebuild and verify it."""

    codec: str
    shape: tuple[int, ...]
    dtype: str  # "bfloat16" | "float16" | "float32"
    original_nbytes: int
    checksum: str  # xxh3-64 hex of the original bytes
    payload: torch.Tensor  # flat uint8; all frames back to back (CPU; pinned when CUDA is present)
    meta: dict[str, Any] = field(default_factory=dict)  # codec-specific, JSON-serialisable

    @classmethod
    def of(cls, codec: str, t: torch.Tensor, payload: torch.Tensor, meta: dict[str, Any]) -> CompressedTensor:
        """The record of `t` compressed by `codec` into `payload`: shape, dtype, size and checksum taken from `t`."""
        return cls(codec=codec, shape=tuple(t.shape), dtype=dtype_name(t.dtype), original_nbytes=t.numel() * t.element_size(),
                   checksum=checksum(t), payload=payload, meta=meta)  # fmt: skip

    @property
    def compressed_nbytes(self) -> int:
        return self.payload.numel()

    @property
    def ratio(self) -> float:
        return self.original_nbytes / max(1, self.compressed_nbytes)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def header(self) -> dict[str, Any]:
        """JSON-serialisable description of everything but the payload."""
        return {
            "codec": self.codec,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "original_nbytes": self.original_nbytes,
            "checksum": self.checksum,
            "meta": self.meta,
        }

    @classmethod
    def from_header(cls, header: dict[str, Any], payload: torch.Tensor) -> CompressedTensor:
        return cls(
            codec=header["codec"],
            shape=tuple(header["shape"]),
            dtype=header["dtype"],
            original_nbytes=header["original_nbytes"],
            checksum=header["checksum"],
            payload=payload,
            meta=header["meta"],
        )


class Codec(ABC):
    """Lossless codec. `decode(encode(t))` is bitwise identical to `t` (NaN payloads, -0.0, subnormals too).

    The runtime relies on exactly these abilities; each has a plain default, and a codec overrides the ones it
    does faster:
        encode / decode                 one tensor (required)
        decode_many(cts, outs, key)     several tensors in one call (default: a loop of decode)
        decode_rows(ct, ids)            the rows of a 2-D table an embedding lookup needs (default: whole table)
        prepare_rows(ct)                decode_rows for one table, prepared once
        prepare_group(cts, offsets)     a prepared decode of several tensors into one buffer (default: decode)
    and two declared facts: `decode_device` (where decode runs) and `stages_host_payloads` (decode_many copies
    host-resident bytes to the GPU itself, so host placement needs no per-layer staging by the runtime).
    """

    name: ClassVar[str]
    decode_device: ClassVar[str] = "cpu"  # where decoding runs ("cpu" or "cuda")
    stages_host_payloads: ClassVar[bool] = False
    # prepare_group's decodes are pure asynchronous launches on the current stream (no allocation, no host sync,
    # no table building): safe inside torch.compile'd code and CUDA-graph capture.
    capturable: ClassVar[bool] = False
    # The weight dtypes the codec stores (None: any), so that a model of another dtype is refused before it loads.
    dtypes: ClassVar[tuple[torch.dtype, ...] | None] = None
    # Modules besides the codec's own that decide its bytes or their layout (a format module, an encoder): the
    # artifact cache hashes their source with the codec's, so that editing them makes a cached artifact a miss.
    format_modules: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def refuse(cls, shape: tuple[int, ...], dtype: torch.dtype) -> str | None:
        """Why a weight of this shape and dtype cannot be stored (one line), or None. Layer selection skips a
        refused layer with this reason, as it skips a tied one."""
        return None

    @abstractmethod
    def encode(self, t: torch.Tensor) -> CompressedTensor: ...

    @abstractmethod
    def decode(self, ct: CompressedTensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rebuild the tensor (shape ct.shape, dtype ct.torch_dtype). Writes into `out` when given
        (a contiguous tensor of that shape and dtype, e.g. a pinned staging buffer) and returns it."""

    def decode_many(self, cts: list[CompressedTensor], outs: list[torch.Tensor], key: Any = None) -> None:
        """Decode `cts[i]` into `outs[i]`. `key` names this exact (tensors, outputs) combination, so a codec
        can reuse what it prepared for it; the default ignores it."""
        for ct, out in zip(cts, outs, strict=True):
            w = self.decode(ct, out=out)
            if w is not out:
                out.copy_(w, non_blocking=True)

    def decode_rows(self, ct: CompressedTensor, ids: torch.Tensor) -> tuple[torch.Tensor, int]:
        """`F.embedding(ids, weight)` bit for bit, and the bytes decoded to get it. The default decodes the whole
        table; a codec whose chunks hold whole rows decodes only the chunks the ids need."""
        return self.prepare_rows(ct)(ids)

    def prepare_rows(self, ct: CompressedTensor) -> Callable[[torch.Tensor], tuple[torch.Tensor, int]]:
        """decode_rows for one table, prepared once (a `capturable` codec's lookup only launches work)."""
        def lookup(ids: torch.Tensor) -> tuple[torch.Tensor, int]:
            table = self.decode(ct).to(ids.device, non_blocking=True)
            return torch.nn.functional.embedding(ids, table), ct.original_nbytes

        return lookup

    def prepare_group(self, cts: list[CompressedTensor], offsets: list[int]) -> Callable[[torch.Tensor], None]:
        """A function that decodes `cts` into a flat uint8 buffer, tensor i at byte `offsets[i]`. A `capturable`
        codec builds everything once here, so each call only launches work on the current stream. The default
        (CPU codecs) decodes through `decode`: torch.compile runs it as an opaque call on the CPU, but a CUDA
        graph cannot capture it."""
        def run(out: torch.Tensor) -> None:
            views = [out[o : o + ct.original_nbytes].view(ct.torch_dtype).view(ct.shape) for ct, o in zip(cts, offsets, strict=True)]
            self.decode_many(cts, views)

        return run

    def settings(self) -> dict[str, Any]:
        """The settings that change the compressed bytes (part of an artifact-cache key)."""
        return {}

    def close(self) -> None:
        """Release buffers the codec keeps between calls (GPU codecs); the runtime calls it when it closes."""
        return None


def make_codec(name: str, **settings: Any) -> Codec:
    """Build a codec by registry name; unknown names raise HarnessError listing the valid ones."""
    return CODECS.get(name)(**settings)
