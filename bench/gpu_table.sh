#!/usr/bin/env bash
# The GPU benchmark table of docs/benchmarks.md in one command (one GPU; ~15 min; rows to $OUT or ./bench-out).
# On the device tool's machine, install the carried wheels first (README of the device tool) and pass OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench-out}; mkdir -p "$out"
F='Warning|warn|INFO|Tip|GPU available|TPU available|LOCAL_RANK|treespec|Tensor Cores|set_float32|num_workers|^\{'
run() { python3 bench/bench_gpu.py "$@" 2>&1 | grep -Ev "$F" || true; }
run --shape llama_1b --batch 1 8 --tokens 32 --repeats 3 --offload --out "$out/llama1b.jsonl"
run --shape llama_8b --batch 1 8 --tokens 16 --repeats 3 --offload --out "$out/llama8b.jsonl" \
    --variants "gpu-placed, block" "gpu-placed, none" "cpu-placed, prefetch" "cpu-placed, block" prototype
for s in llama_1b llama_8b; do
  run --shape $s --batch 1 8 --tokens 32 --repeats 3 --rounds 3 --ab "nvcomp gpu-placed, block (batched)" --out "$out/ab.jsonl"
done
