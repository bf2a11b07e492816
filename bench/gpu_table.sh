#!/usr/bin/env bash
# The GPU benchmark tables of docs/benchmarks.md (one GPU; rows to $OUT or ./bench-out as JSON lines).
#   bash bench/gpu_table.sh          # everything (~25 min on an H100)
#   bash bench/gpu_table.sh 1b       # one part: 1b | 8b | ab
# Needs a CUDA build of torch and the [gpu] extra (README: Set-up); OUT names the output directory.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench-out}; mkdir -p "$out"
F='Warning|warn|INFO|Tip|GPU available|TPU available|LOCAL_RANK|treespec|Tensor Cores|set_float32|num_workers|^\{'
run() { python3 bench/bench_gpu.py "$@" 2>&1 | grep -Ev "$F" || true; }
part=${1:-all}
if [[ $part == all || $part == 1b ]]; then
  run --shape llama_1b --batch 1 8 --tokens 32 --slow-tokens 8 --repeats 3 --offload --out "$out/llama1b.jsonl" \
      --variants prototype "zstd_grouped L1" "ans-batched gpu-placed, block" "ans-batched cpu-placed, block ahead" \
                 "ans-batched cpu-placed, prefetch"
fi
if [[ $part == all || $part == 8b ]]; then
  run --shape llama_8b --batch 1 8 --tokens 16 --slow-tokens 4 --repeats 3 --offload --out "$out/llama8b.jsonl" \
      --variants prototype "zstd_grouped L1" "ans-batched gpu-placed, block" "ans-batched cpu-placed, block ahead"
fi
if [[ $part == all || $part == ab ]]; then
  for s in llama_1b llama_8b; do
    run --shape $s --batch 1 8 --tokens 32 --repeats 3 --rounds 3 --out "$out/ab.jsonl" \
        --ab "ans-batched gpu-placed, block" "ans-batched gpu-placed, block ahead" "nvcomp gpu-placed, block (batched)"
  done
fi
