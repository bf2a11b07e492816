"""`zipnn`: ZipNN (the `zipnn` package) as a CPU codec: byte grouping + Huffman (FSE's HUF) per chunk, in C.

ZipNN splits a float tensor's bytes into groups (for bf16 it moves the sign bit next to the mantissa, so the
exponent gets a byte of its own, as zstd_grouped does) and Huffman-codes each group per `compression_chunk`,
keeping a chunk raw when coding saves too little. Its frames carry no checksum, so the codec stores an xxh3 of
the payload and checks it on every decode (the runtime checks the decoded weight only on the first).
It is called in ZipNN's "byte" mode with the dtype named: the tensor's raw bytes in, raw bytes out.
"""

from __future__ import annotations

import importlib.metadata
import threading
from typing import Any

import numpy as np
import torch
import xxhash

from harness.codecs.base import CODECS, DTYPES, Codec, CompressedTensor, cpu_output, dtype_name, raw_bytes
from harness.errors import HarnessError, IntegrityError

DEFAULT_CHUNK_BYTES = 256 * 1024  # ZipNN's default compression_chunk


def _zipnn_class() -> type:
    try:
        from zipnn import ZipNN
    except ImportError as e:
        raise HarnessError(
            f"codec zipnn needs the zipnn package: pip install 'codecllm-harness[zipnn]' (zipnn==0.5.4): {e}"
        ) from e
    return ZipNN


@CODECS.register("zipnn")
class ZipNNCodec(Codec):
    """ZipNN byte grouping + Huffman, CPU."""

    name = "zipnn"

    def __init__(self, threads: int = 1, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        # No level: ZipNN's default method (Huffman) has none.
        if not isinstance(threads, int) or threads < 1:
            raise HarnessError(f"zipnn: threads={threads!r} is invalid; use an integer >= 1")
        if not isinstance(chunk_bytes, int) or chunk_bytes < 1024 or chunk_bytes & (chunk_bytes - 1):
            raise HarnessError(
                f"zipnn: chunk_bytes={chunk_bytes!r} is invalid; use a power of two >= 1024 (default 256 KiB)"
            )
        self.cls = _zipnn_class()
        self.threads, self.chunk_bytes = threads, chunk_bytes
        self._local = threading.local()  # ZipNN keeps per-call header state in the instance: one per thread

    def settings(self) -> dict[str, Any]:
        return {"zipnn": importlib.metadata.version("zipnn"), "chunk_bytes": self.chunk_bytes}

    def _zipnn(self, dtype: str, chunk_bytes: int) -> Any:
        cache = self._local.__dict__.setdefault("zipnn", {})
        key = (dtype, chunk_bytes)
        if key not in cache:
            cache[key] = self.cls(
                input_format="byte", bytearray_dtype=dtype, threads=self.threads, compression_chunk=chunk_bytes
            )
        return cache[key]

    def encode(self, t: torch.Tensor) -> CompressedTensor:
        dtype = dtype_name(t.dtype)
        if dtype not in DTYPES:
            raise HarnessError(f"{self.name}: unsupported dtype {t.dtype}; supported: {', '.join(DTYPES)}")
        data = raw_bytes(t)
        frame = self._zipnn(dtype, self.chunk_bytes).compress(data.numpy().tobytes()) if data.numel() else b""
        payload = torch.frombuffer(bytearray(frame), dtype=torch.uint8) if frame else torch.zeros(0, dtype=torch.uint8)
        if torch.cuda.is_available():
            payload = payload.pin_memory()
        return CompressedTensor.of(
            self.name,
            t,
            payload,
            meta={"chunk_bytes": self.chunk_bytes, "payload_xxh3": xxhash.xxh3_64_hexdigest(frame)},
        )

    def decode(self, ct: CompressedTensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if ct.codec != self.name:
            raise ValueError(f"codec {self.name!r} cannot decode a tensor compressed with {ct.codec!r}")
        out = cpu_output(ct, out)
        src = ct.payload.numpy()
        if xxhash.xxh3_64_hexdigest(src) != ct.meta["payload_xxh3"]:
            raise IntegrityError("zipnn payload is corrupted (xxh3 mismatch)")
        if ct.original_nbytes == 0:
            return out
        raw = self._zipnn(ct.dtype, ct.meta["chunk_bytes"]).decompress(src)  # zipnn_core reads it through a memoryview
        if len(raw) != ct.original_nbytes:
            raise IntegrityError(f"zipnn decoded {len(raw)} bytes, expected {ct.original_nbytes}")
        out.view(-1).view(torch.uint8).numpy()[:] = np.frombuffer(raw, np.uint8)
        return out
