"""GPU codec benchmark: nvCOMP's Python API (`nvcomp_ans`) against the batched C API (`nvcomp_ans_batched`)
on one Llama-3.2-1B block's seven weights: ratio, bit-exactness, host time per call, GPU time per call, and
whether a call returns before earlier GPU work finishes (asynchronous) or waits for it (synchronising).

    python bench/bench_nvcomp_block.py     # needs CUDA and the [gpu] extra; table in docs/benchmarks.md

Prints the card, driver and package versions first, so a recorded output names its machine."""
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import machine  # noqa: E402  (bench/machine.py, next to this script)
import torch  # noqa: E402

from harness.codecs import make_codec  # noqa: E402

dev = torch.device("cuda")
torch.manual_seed(0)
SHAPES = [(2048, 2048), (512, 2048), (512, 2048), (2048, 2048), (8192, 2048), (8192, 2048), (2048, 8192)]
ws = [(torch.randn(s, device=dev) * 0.02).to(torch.bfloat16) for s in SHAPES]
total = sum(w.numel() * 2 for w in ws)


def views(buf):
    out, pos = [], 0
    for w in ws:
        n = w.numel() * 2
        out.append(buf[pos : pos + n].view(torch.bfloat16).view(w.shape))
        pos += -(-n // 256) * 256
    return out


buf = torch.empty(sum(-(-w.numel() * 2 // 256) * 256 for w in ws), dtype=torch.uint8, device=dev)
print(machine.line(machine.describe()))
print(f"block of {total / 1e6:.1f} MB")
print(f"{'codec':34} {'ratio':>7} {'enc s':>6} {'exact':>5} {'host us/call':>12} {'gpu ms/call':>11} {'GB/s':>6} "
      f"{'after sleep us':>14} {'1-layer host us':>15}")
# Chunk sizes spelled out: the codec's default changed once (64 KiB -> 256 KiB), and a row must not depend on it.
for name, kw, placement in [("nvcomp_ans", {}, "gpu"), ("nvcomp_ans_batched", {"chunk_bytes": 1 << 16}, "gpu"),
                            ("nvcomp_ans_batched", {"chunk_bytes": 1 << 18}, "gpu"),
                            ("nvcomp_ans_batched", {"chunk_bytes": 1 << 20}, "gpu"),
                            ("nvcomp_ans_batched", {"chunk_bytes": 1 << 18}, "cpu")]:
    codec = make_codec(name, **kw)
    t = time.perf_counter()
    cts = [codec.encode(w) for w in ws]
    torch.cuda.synchronize()
    enc_s = time.perf_counter() - t
    if placement == "cpu":
        for ct in cts:
            ct.payload = ct.payload.cpu().pin_memory()
    ratio = total / sum(ct.compressed_nbytes for ct in cts)
    outs = views(buf)
    buf.zero_()
    codec.decode_many(cts, outs)
    torch.cuda.synchronize()
    exact = all(torch.equal(o, w) for o, w in zip(outs, ws))
    host = []
    for _ in range(30):
        t = time.perf_counter()
        codec.decode_many(cts, outs)
        host.append(time.perf_counter() - t)
        torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(20):
        codec.decode_many(cts, outs)
    e1.record()
    torch.cuda.synchronize()
    gpu_ms = e0.elapsed_time(e1) / 20
    torch.cuda._sleep(int(60e6))  # ~30 ms of GPU busy-wait ahead of the decode on the same stream
    t = time.perf_counter()
    codec.decode_many(cts, outs)
    after_sleep = time.perf_counter() - t
    torch.cuda.synchronize()
    one = []
    single_out = torch.empty_like(ws[4])
    for _ in range(30):
        t = time.perf_counter()
        codec.decode(cts[4], out=single_out)
        one.append(time.perf_counter() - t)
    torch.cuda.synchronize()
    exact &= torch.equal(single_out, ws[4])
    label = f"{name} {kw.get('chunk_bytes', '')} {placement}"
    print(f"{label:34} {ratio:7.4f} {enc_s:6.2f} {str(exact):>5} {1e6 * statistics.median(host):12.1f} {gpu_ms:11.3f} "
          f"{total / gpu_ms / 1e6:6.0f} {1e6 * after_sleep:14.1f} {1e6 * statistics.median(one):15.1f}", flush=True)
    codec.close()
