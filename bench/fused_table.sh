#!/usr/bin/env bash
# The fused tables of docs/fused.md, one GPU:
#   bash bench/fused_table.sh [kernel|1b|8b|all] [out-dir]
# kernel: bench/lut3_kernel.py (every matrix shape against cuBLAS and the exactness reference, M=1 and 8, with the
#         diagnostic variants that split the time);
# 1b/8b:  bench/bench_compile.py, one process per shape: dense compiled, block compiled (decompress-then-matmul),
#         fused compiled and its exactness reference, arms alternated in rounds, b=1 and b=8.
set -euo pipefail
cd "$(dirname "$0")/.."
which="${1:-all}"
out="${2:-.}"
mkdir -p "$out"
if [[ "$which" == kernel || "$which" == all ]]; then
  python bench/lut3_kernel.py --out "$out/lut3_kernel.jsonl"
fi
# rounds: 5 at 1B (~4 min), 3 at 8B (~9 min, inside a 10-minute device call); --split times the eager prefill
# alone, --profile-prefill says where the fused arm's prefill time goes.
for shape in 1b 8b; do
  if [[ "$which" == "$shape" || "$which" == all ]]; then
    rounds=5 && [[ "$shape" == 8b ]] && rounds=3
    python bench/bench_compile.py --shape "llama_$shape" --batch 1 8 --tokens 64 --rounds "$rounds" \
      --arms dense_compiled block_compiled fused_compiled fused_ref_compiled --split --profile-prefill fused_compiled \
      --out "$out/fused_$shape.jsonl"
  fi
done
