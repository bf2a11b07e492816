"""`fused_lut3`: the lut3 format (harness/fused/lut3.py), which `cache=fused` multiplies with in its CUDA kernel.

The codec protocol stores one flat uint8 payload per tensor, so the format's four tensors go back to back in it,
each 16-byte aligned (the int32 parts are read through int32 views): signman | codes | esc_exp | esc_off. `meta`
holds each one's offset and size and the 7-exponent table. `packed(ct)` gives the Lut3 as views of the payload
(no copy), wherever the payload lives: that is what the fused policy hands the kernel.

Encoding runs on the weight's device (the GPU for a model loaded there: seconds for an 8B model). Decoding runs
where `decode_device` says: on CUDA the kernel's own decode (lut3_cuda.decode_gpu, the same bit operations as the
fused GEMV, written out), else the torch reference (lut3.decode). Both are exact inverses of the encoder.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from harness.codecs.base import CODECS, Codec, CompressedTensor, checksum, dtype_name
from harness.errors import HarnessError
from harness.fused import lut3

ALIGN = 16
PARTS = ("signman", "codes", "esc_exp", "esc_off")


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@CODECS.register("fused_lut3")
class FusedLut3Codec(Codec):
    """lut3: 3-bit exponent codes (7-entry table + escapes) and raw sign+mantissa bytes, bf16 only (~1.43x)."""

    name = "fused_lut3"
    dtypes: ClassVar[tuple[torch.dtype, ...]] = (torch.bfloat16,)
    format_modules = ("harness.fused.lut3",)  # the bytes are the format module's

    def __init__(self) -> None:
        # The kernel's decode wherever there is a GPU (as dfloat11's auto): that is the decode that must be exact.
        self.decode_device = "cuda" if torch.cuda.is_available() else "cpu"

    @classmethod
    def refuse(cls, shape: tuple[int, ...], dtype: torch.dtype) -> str | None:
        return lut3.supported(tuple(shape), dtype)

    def encode(self, t: torch.Tensor) -> CompressedTensor:
        why = lut3.supported(tuple(t.shape), t.dtype)
        if why:
            raise HarnessError(f"codec {self.name}: {why}")
        p = lut3.encode(t)
        parts = [p.signman, p.codes.reshape(-1).view(torch.uint8), p.esc_exp, p.esc_off.view(torch.uint8)]
        offsets, sizes, pos = {}, {}, 0
        for name, part in zip(PARTS, parts, strict=True):
            offsets[name], sizes[name] = pos, part.numel()
            pos = _align(pos + part.numel())
        payload = torch.zeros(pos, dtype=torch.uint8, device=t.device)
        for name, part in zip(PARTS, parts, strict=True):
            payload[offsets[name] : offsets[name] + sizes[name]].copy_(part)
        return CompressedTensor(
            codec=self.name,
            shape=tuple(t.shape),
            dtype=dtype_name(t.dtype),
            original_nbytes=t.numel() * t.element_size(),
            checksum=checksum(t),
            payload=payload,
            meta={"offsets": offsets, "sizes": sizes, "exponents": list(p.exponents)},
        )

    @staticmethod
    def packed(ct: CompressedTensor, payload: torch.Tensor | None = None) -> lut3.Lut3:
        """The Lut3 as views of `payload` (default: ct.payload) on its device: nothing is copied."""
        buf = ct.payload if payload is None else payload
        off, size = ct.meta["offsets"], ct.meta["sizes"]

        def part(name: str) -> torch.Tensor:
            return buf[off[name] : off[name] + size[name]]

        return lut3.Lut3(tuple(ct.shape), part("signman"), part("codes").view(torch.int32).view(3, -1),
                         part("esc_exp"), part("esc_off").view(torch.int32), tuple(ct.meta["exponents"]))  # fmt: skip

    def decode(self, ct: CompressedTensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if ct.codec != self.name:
            raise ValueError(f"codec {self.name!r} cannot decode a tensor compressed with {ct.codec!r}")
        if self.decode_device == "cuda":
            from harness.fused import lut3_cuda

            device = torch.device("cuda", torch.cuda.current_device())
            # placement=cpu: the bytes cross PCIe first (ordered before the kernel on this stream)
            payload = ct.payload if ct.payload.device == device else ct.payload.to(device, non_blocking=True)
            w = lut3_cuda.decode_gpu(self.packed(ct, payload))
        else:
            w = lut3.decode(self.packed(ct, ct.payload.cpu()))
        if out is None:
            return w
        if out.dtype != torch.bfloat16 or tuple(out.shape) != tuple(ct.shape) or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous bfloat16 tensor of shape {tuple(ct.shape)}; "
                             f"got {tuple(out.shape)} {out.dtype}")  # fmt: skip
        return out.copy_(w, non_blocking=True)
