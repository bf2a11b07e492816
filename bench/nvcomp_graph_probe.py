"""Can nvCOMP ANS decodes be captured in a CUDA graph, and what does a block's decode cost on the host?"""
import time

import torch
from nvidia import nvcomp

dev = torch.device("cuda")
torch.manual_seed(0)
shapes = [(2048, 2048), (512, 2048), (512, 2048), (2048, 2048), (8192, 2048), (8192, 2048), (2048, 8192)]
ws = [(torch.randn(s, device=dev) * 0.02).to(torch.bfloat16) for s in shapes]
stream = torch.cuda.Stream()
with torch.cuda.stream(stream):
    s = stream.cuda_stream
    codec = nvcomp.Codec(algorithm="ANS", data_type="<f2", cuda_stream=s)
    comps = []
    for w in ws:
        c = codec.encode(nvcomp.as_array(w.view(-1).view(torch.uint8), cuda_stream=s))
        p = torch.as_tensor(c, device=dev).view(torch.uint8).reshape(-1)[: c.buffer_size].clone()
        comps.append(p)
    torch.cuda.synchronize()
    srcs = [nvcomp.as_array(p, cuda_stream=s) for p in comps]
    cfgs = [codec.decompression_config(a) for a in srcs]
    outs = [torch.empty_like(w) for w in ws]
    oarrs = [nvcomp.as_array(o.view(-1).view(torch.uint8), cuda_stream=s) for o in outs]

    def block():
        for a, o, c in zip(srcs, oarrs, cfgs):
            codec.decode(a, out=o, decompression_config=c)

    for _ in range(5): block()
    torch.cuda.synchronize()
    n = 100
    t = time.perf_counter()
    for _ in range(n): block()
    th = (time.perf_counter() - t) / n
    torch.cuda.synchronize(); tt = (time.perf_counter() - t) / n
    nbytes = sum(w.numel() * 2 for w in ws)
    print(f"eager block of 7: host {th*1e6:.0f} us, host+gpu {tt*1e6:.0f} us, {nbytes/tt/1e9:.0f} GB/s", flush=True)
    print("eager exact", all(torch.equal(o, w) for o, w in zip(outs, ws)), flush=True)
    for o in outs: o.fill_(0)
torch.cuda.synchronize()
try:
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=stream):
        block()
    torch.cuda.synchronize()
    g.replay(); torch.cuda.synchronize()
    print("graph exact", all(torch.equal(o, w) for o, w in zip(outs, ws)), flush=True)
    for _ in range(5): g.replay()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n): g.replay()
    th = (time.perf_counter() - t) / n
    torch.cuda.synchronize(); tt = (time.perf_counter() - t) / n
    print(f"graph block of 7: host {th*1e6:.0f} us, host+gpu {tt*1e6:.0f} us, {nbytes/tt/1e9:.0f} GB/s", flush=True)
except Exception as e:
    print("graph capture failed:", repr(e)[:400], flush=True)
