"""nvCOMP ANS on the GPU (DFloat11-style entropy coding of bf16 words; lossless, bit-exact).

nvCOMP is imported lazily: CPU machines never need it. Decoding runs on the caller's current CUDA stream,
so a prefetch worker on a side stream decodes there. nvCOMP's Codec and DecompressConfig objects are
thread-local by contract, so each (thread, stream) gets its own Codec and its own configs, built once per
layer (building a config from a buffer synchronises once; decoding with it afterwards does not).
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from harness.codecs.base import CODECS, Codec, CompressedTensor, checksum, cuda_source, dtype_name
from harness.errors import HarnessError

# nvCOMP's element type for ANS: 2-byte words for 16-bit floats (exponent and mantissa bytes modelled
# together), bytes for fp32.
_DATA_TYPE = {torch.bfloat16: "<f2", torch.float16: "<f2", torch.float32: "|u1"}


def _nvcomp():
    try:
        from nvidia import nvcomp
    except ImportError:
        raise HarnessError(
            "codec nvcomp_ans needs nvCOMP: pip install nvidia-nvcomp-cu13 nvidia-libnvcomp-cu13 "
            "(or the project's [gpu] extra)"
        ) from None
    return nvcomp


@CODECS.register("nvcomp_ans")
class NvcompANS(Codec):
    name = "nvcomp_ans"
    decode_device = "cuda"

    def __init__(self) -> None:
        if not torch.cuda.is_available():
            raise HarnessError("codec nvcomp_ans decodes on the GPU but torch.cuda.is_available() is False; use zstd_grouped")
        self.nvcomp = _nvcomp()
        self._local = threading.local()

    def _state(self, data_type: str) -> dict[str, Any]:
        """Codec + per-layer decompression configs of this thread and current stream."""
        stream = torch.cuda.current_stream().cuda_stream
        per_thread = self._local.__dict__.setdefault("states", {})
        key = (stream, data_type)
        if key not in per_thread:
            codec = self.nvcomp.Codec(algorithm="ANS", data_type=data_type, cuda_stream=stream)
            per_thread[key] = {"codec": codec, "configs": {}, "stream": stream}
        return per_thread[key]

    def encode(self, t: torch.Tensor) -> CompressedTensor:
        data_type, src, flat = cuda_source(t, self.name, _DATA_TYPE)
        state = self._state(data_type)
        comp = state["codec"].encode(self.nvcomp.as_array(flat, cuda_stream=state["stream"]))
        payload = torch.as_tensor(comp, device=src.device).view(torch.uint8).reshape(-1)[: comp.buffer_size].clone()
        torch.cuda.current_stream().synchronize()  # `comp` is freed when this returns
        return CompressedTensor(
            codec=self.name,
            shape=tuple(t.shape),
            dtype=dtype_name(t.dtype),
            original_nbytes=flat.numel(),
            checksum=checksum(src),
            payload=payload,
            meta={"data_type": data_type},
        )

    def decode(self, ct: CompressedTensor, out: torch.Tensor | None = None) -> torch.Tensor:
        state = self._state(ct.meta["data_type"])
        device = torch.device("cuda", torch.cuda.current_device())
        src = ct.payload
        if src.device.type != "cuda":  # placement=cpu: the compressed bytes cross PCIe (async from pinned memory)
            src = src.to(device, non_blocking=True)
        if out is None:
            out = torch.empty(ct.shape, dtype=ct.torch_dtype, device=device)
        nv = self.nvcomp
        src_arr = nv.as_array(src, cuda_stream=state["stream"])
        cfg = state["configs"].get(id(ct))
        if cfg is None:
            cfg = state["configs"][id(ct)] = state["codec"].decompression_config(src_arr)
        state["codec"].decode(
            src_arr, out=nv.as_array(out.view(-1).view(torch.uint8), cuda_stream=state["stream"]), decompression_config=cfg
        )
        return out

    def decode_many(self, cts: list[CompressedTensor], outs: list[torch.Tensor], key: Any = None) -> None:
        """Decode several GPU-resident tensors in ONE batched nvCOMP call (a transformer block's weights).

        The batch wrappers and the decompression config are built once per (layers, output buffer) and reused
        every pass: the host cost is one call instead of one per layer, and no synchronisation."""
        state = self._state(cts[0].meta["data_type"])
        key = (tuple(id(ct) for ct in cts), tuple(o.data_ptr() for o in outs))
        prepared = state["configs"].get(key)
        if prepared is None:
            nv, stream = self.nvcomp, state["stream"]
            src = nv.as_arrays([ct.payload for ct in cts], cuda_stream=stream)
            dst = nv.as_arrays([o.view(-1).view(torch.uint8) for o in outs], cuda_stream=stream)
            prepared = state["configs"][key] = (src, dst, state["codec"].decompression_config(src))
        src, dst, cfg = prepared
        state["codec"].decode(src, out=dst, decompression_config=cfg)

