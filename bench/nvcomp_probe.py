"""Explore the nvCOMP Python API on the device: round trip via torch tensors, per-call host overhead."""
import time

import torch
from nvidia import nvcomp

dev = torch.device("cuda")
s = torch.cuda.current_stream().cuda_stream
w = (torch.randn(2048, 8192, device=dev) * 0.02).to(torch.bfloat16)
codec = nvcomp.Codec(algorithm="ANS", data_type="<f2", cuda_stream=s)
arr = nvcomp.as_array(w.view(torch.uint8).reshape(-1), cuda_stream=s)
comp = codec.encode(arr)
torch.cuda.synchronize()
print("comp type", type(comp), comp.buffer_size, comp.buffer_kind, comp.dtype, comp.shape)
ct = torch.as_tensor(comp, device=dev)  # via __cuda_array_interface__
print("as_tensor", ct.dtype, ct.shape, ct.numel())
payload = ct.view(torch.uint8).reshape(-1)[: comp.buffer_size].clone()
print("payload", payload.numel(), w.numel() * 2 / payload.numel())
cfg = codec.decompression_config(comp)
out = torch.empty(w.numel() * 2, dtype=torch.uint8, device=dev)
oarr = nvcomp.as_array(out, cuda_stream=s)
parr = nvcomp.as_array(payload, cuda_stream=s)
r = codec.decode(parr, out=oarr, decompression_config=cfg)
torch.cuda.synchronize()
print("exact", torch.equal(out.view(torch.bfloat16).view(w.shape), w), type(r))
# host overhead per decode call: prebuilt arrays vs fresh wrappers
for label, fn in (
    ("prebuilt", lambda: codec.decode(parr, out=oarr, decompression_config=cfg)),
    ("fresh", lambda: codec.decode(nvcomp.as_array(payload, cuda_stream=s), out=nvcomp.as_array(out, cuda_stream=s), decompression_config=cfg)),
):
    for _ in range(10): fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(200): fn()
    th = (time.perf_counter() - t) / 200
    torch.cuda.synchronize()
    tt = (time.perf_counter() - t) / 200
    print(f"{label}: host {th*1e6:.1f} us/call, with sync {tt*1e6:.1f} us/call, {w.numel()*2/tt/1e9:.0f} GB/s")
# pinned-host payload: does decode accept a host array?
hp = payload.cpu().pin_memory()
try:
    r = codec.decode(nvcomp.as_array(hp), out=oarr, decompression_config=cfg); torch.cuda.synchronize()
    print("host-src decode exact", torch.equal(out.view(torch.bfloat16).view(w.shape), w))
except Exception as e:
    print("host-src decode fails:", repr(e)[:200])
# config reuse on a different buffer of same shape
w2 = (torch.randn(2048, 8192, device=dev) * 0.02).to(torch.bfloat16)
comp2 = codec.encode(nvcomp.as_array(w2.view(torch.uint8).reshape(-1), cuda_stream=s))
codec.decode(comp2, out=oarr, decompression_config=cfg); torch.cuda.synchronize()
print("cfg reuse exact", torch.equal(out.view(torch.bfloat16).view(w.shape), w2))
# batch API
try:
    print([n for n in dir(nvcomp) if not n.startswith("_")])
except Exception as e:
    print(e)
# H2D copy + decode timing for the cpu placement
stage = torch.empty_like(payload)
def h2d_decode():
    stage.copy_(hp, non_blocking=True)
    codec.decode(nvcomp.as_array(stage, cuda_stream=s), out=oarr, decompression_config=cfg)
for _ in range(5): h2d_decode()
torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(50): h2d_decode()
torch.cuda.synchronize(); tt = (time.perf_counter() - t) / 50
print(f"h2d+decode {tt*1e6:.0f} us per 32MB layer -> {w.numel()*2/tt/1e9:.1f} GB/s of weights")
