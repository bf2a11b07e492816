"""`dfloat11`: DFloat11's format (Huffman-coded bf16 exponents), decoded on the GPU by DF11's own CUDA kernel.

The payload holds DF11's exact buffers back to back, each 16-byte aligned (the kernel reads output_positions as
uint32): luts | encoded_exponent | sign_mantissa | output_positions | gaps. `meta` gives each one's offset and
size, plus the launch's shared memory. Encoding is `dfloat11_format.encode_exponents` (vectorised, on the tensor's
device); decoding launches `decode` from the package's decode.ptx through cupy with DF11's grid, block and shared
memory (its loader's `decode_hook`), on torch's current stream. On a machine without CUDA the codec decodes on
the CPU with the numpy reference decoder (slow: for tests and CPU-only runs, not for speed); with CUDA but no
cupy it refuses to start (`decoder=cpu` forces the reference decoder).

Integrity: the CPU decoder checks an xxh3 of the payload on every decode. The GPU decoder checks nothing itself
(hashing on the host would cost more than the decode); the runtime's checksum of the first decode covers it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from functools import cache
from typing import Any

import numpy as np
import torch
import xxhash

from harness.codecs import dfloat11_format as fmt
from harness.codecs.base import CODECS, Codec, CompressedTensor, checksum, dtype_name
from harness.errors import HarnessError, IntegrityError

ALIGN = 16
BUFFERS = ("luts", "encoded_exponent", "sign_mantissa", "output_positions", "gaps")
SHARED_MEM_DEFAULT_LIMIT = 48 * 1024  # above this a kernel must opt in to more dynamic shared memory


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def cupy_usable() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("cupy") is not None


@cache
def _kernel(device_index: int) -> Any:
    """DF11's `decode` kernel from the installed package's PTX, loaded on one device (as DF11's module does)."""
    try:
        import cupy as cp
    except ImportError as e:
        raise HarnessError(
            f"codec dfloat11 decodes on the GPU through cupy: pip install cupy-cuda12x (or -cuda13x): {e}"
        ) from e
    with cp.cuda.Device(device_index):
        return cp.RawModule(path=str(fmt.package_dir() / "decode.ptx")).get_function("decode")


@CODECS.register("dfloat11")
class DFloat11Codec(Codec):
    """DFloat11: Huffman-coded exponents + raw sign/mantissa bytes (bf16 only)."""

    name = "dfloat11"
    format_modules = ("harness.codecs.dfloat11_format",)  # our encoder

    def __init__(self, decoder: str = "auto") -> None:
        if decoder not in ("auto", "cuda", "cpu"):
            raise HarnessError(f"dfloat11: decoder={decoder!r} is invalid; valid: auto, cuda, cpu")
        fmt.df11_utils()  # a missing dfloat11/dahuffman fails here, with the pip command
        if decoder == "auto":  # the GPU kernel wherever there is a GPU: a silent CPU fallback would be ~1000x slower
            decoder = "cuda" if torch.cuda.is_available() else "cpu"
        if decoder == "cuda" and not cupy_usable():
            raise HarnessError(
                "codec dfloat11 decodes on the GPU through cupy, which is missing or has no CUDA: "
                "pip install cupy-cuda12x (or cupy-cuda13x, matching your CUDA)"
            )
        self.decode_device = decoder

    def settings(self) -> dict[str, Any]:
        # The bytes depend on DF11's table construction (its version and dahuffman's), the launch geometry and
        # our encoder (dfloat11_format.py, hashed by the artifact cache as a format module).
        return {
            "dfloat11": importlib.metadata.version("dfloat11"),
            "dahuffman": importlib.metadata.version("dahuffman"),
            "bytes_per_thread": fmt.BYTES_PER_THREAD,
            "threads_per_block": fmt.THREADS_PER_BLOCK,
        }

    # -- encode -----------------------------------------------------------------------------------------------------
    def encode(self, t: torch.Tensor) -> CompressedTensor:
        if t.dtype != torch.bfloat16:
            raise HarnessError(
                f"codec dfloat11 encodes bfloat16 only, not {t.dtype}; use zstd_grouped for other dtypes"
            )
        n = t.numel()
        if n >= 1 << 31:
            raise HarnessError(f"dfloat11: {n} elements is too many; its kernel indexes with 32-bit ints")
        exponent, sign_mantissa = fmt.split_bf16(t)
        if n:
            table, luts = fmt.build_tables(exponent)
            encoded, gaps, positions = fmt.encode_exponents(exponent, table)
        else:  # nothing to decode: no tables (dahuffman cannot build a code from no symbols)
            luts = torch.zeros(0, 256, dtype=torch.uint8)
            encoded = gaps = torch.zeros(0, dtype=torch.uint8)
            positions = torch.zeros(0, dtype=torch.int32)
        parts = [luts.reshape(-1), encoded, sign_mantissa, positions.view(torch.uint8), gaps]
        # the kernel reads one gaps byte past the last thread's 5 bits (gaps[t*5/8 + 1]): pad inside the payload
        sizes = [p.numel() for p in parts]
        offsets, pos = [], 0
        for size in sizes:
            offsets.append(pos)
            pos = _align(pos + size + 1)
        payload = torch.zeros(pos, dtype=torch.uint8, pin_memory=torch.cuda.is_available())
        for part, off in zip(parts, offsets, strict=True):
            payload[off : off + part.numel()].copy_(part, non_blocking=False)
        positions_np = positions.cpu().numpy()
        return CompressedTensor(
            codec=self.name,
            shape=tuple(t.shape),
            dtype=dtype_name(t.dtype),
            original_nbytes=2 * n,
            checksum=checksum(t),
            payload=payload,
            meta={
                "offsets": dict(zip(BUFFERS, offsets, strict=True)),
                "sizes": dict(zip(BUFFERS, sizes, strict=True)),
                "n_luts": int(luts.shape[0]),
                "blocks": -(-encoded.numel() // (fmt.THREADS_PER_BLOCK * fmt.BYTES_PER_THREAD)),
                "shared_mem": fmt.shared_mem_bytes(positions_np) if n else 0,
                "payload_xxh3": xxhash.xxh3_64_hexdigest(payload.numpy()),
            },
        )

    # -- decode -----------------------------------------------------------------------------------------------------
    @staticmethod
    def buffer(ct: CompressedTensor, payload: torch.Tensor, name: str) -> torch.Tensor:
        off, size = ct.meta["offsets"][name], ct.meta["sizes"][name]
        return payload[off : off + size]

    def _check(self, ct: CompressedTensor, out: torch.Tensor | None, device: torch.device) -> torch.Tensor:
        if ct.codec != self.name:
            raise ValueError(f"codec {self.name!r} cannot decode a tensor compressed with {ct.codec!r}")
        if out is None:
            return torch.empty(ct.shape, dtype=torch.bfloat16, device=device)
        if (
            out.dtype != torch.bfloat16
            or tuple(out.shape) != tuple(ct.shape)
            or out.device != device
            or not out.is_contiguous()
        ):
            raise ValueError(
                f"out must be a contiguous bfloat16 tensor of shape {tuple(ct.shape)} on {device}; "
                f"got {tuple(out.shape)} {out.dtype} on {out.device}"
            )
        return out

    def decode(self, ct: CompressedTensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if self.decode_device == "cuda":
            return self.decode_cuda(ct, out)
        return self.decode_cpu(ct, out)

    def decode_cpu(self, ct: CompressedTensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The numpy reference decoder (what DF11's kernel computes), into a CPU tensor."""
        out = self._check(ct, out, torch.device("cpu"))
        payload = ct.payload.cpu().numpy()
        if xxhash.xxh3_64_hexdigest(payload) != ct.meta["payload_xxh3"]:
            raise IntegrityError("dfloat11 payload is corrupted (xxh3 mismatch)")
        n = out.numel()
        if n == 0:
            return out
        part = {name: self.buffer(ct, ct.payload, name).cpu().numpy() for name in BUFFERS}
        exponent = fmt.decode_exponents(
            part["luts"].reshape(ct.meta["n_luts"], 256),
            part["encoded_exponent"],
            part["output_positions"].view(np.uint32),
            part["gaps"],
            n,
        )
        fmt.merge_bf16(exponent, part["sign_mantissa"], out.view(-1).view(torch.uint16).numpy())
        return out

    def decode_cuda(self, ct: CompressedTensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """DF11's CUDA kernel, launched as its loader's decode hook launches it, on torch's current stream."""
        import cupy as cp

        device = torch.device("cuda", torch.cuda.current_device())
        out = self._check(ct, out, device)
        n = out.numel()
        if n == 0:
            return out
        # placement=cpu: the bytes cross PCIe first (async from pinned memory, ordered before the kernel on this stream)
        payload = ct.payload if ct.payload.device == device else ct.payload.to(device, non_blocking=True)
        kernel = _kernel(device.index)
        shared_mem = ct.meta["shared_mem"]
        ptr = {name: self.buffer(ct, payload, name).data_ptr() for name in BUFFERS}
        with cp.cuda.Device(device.index), cp.cuda.ExternalStream(torch.cuda.current_stream(device).cuda_stream):
            if shared_mem > SHARED_MEM_DEFAULT_LIMIT and kernel.max_dynamic_shared_size_bytes < shared_mem:
                # DF11's loader never opts in; a block of highly compressible weights (> ~23k elements) needs it
                kernel.max_dynamic_shared_size_bytes = shared_mem
            kernel(
                (ct.meta["blocks"],),
                (fmt.THREADS_PER_BLOCK,),
                (
                    ptr["luts"],
                    ptr["encoded_exponent"],
                    ptr["sign_mantissa"],
                    ptr["output_positions"],
                    ptr["gaps"],
                    out.data_ptr(),
                    np.int32(ct.meta["n_luts"]),
                    np.int32(ct.meta["sizes"]["encoded_exponent"]),
                    np.int32(n),
                ),
                shared_mem=shared_mem,
            )
        return out
