#!/usr/bin/env bash
# The compile table of docs/benchmarks.md ("Compressed weights in the fastest dense stack"), one GPU:
#   bash bench/compile_table.sh [1b|8b|all] [out.jsonl]
# Every row of one shape comes from one process, the arms alternated in rounds (bench/bench_compile.py).
set -euo pipefail
cd "$(dirname "$0")/.."
which="${1:-all}"
out="${2:-bench_compile.jsonl}"
if [[ "$which" == 1b || "$which" == all ]]; then
  python bench/bench_compile.py --shape llama_1b --batch 1 8 --tokens 64 --rounds 5 --out "$out"
fi
if [[ "$which" == 8b || "$which" == all ]]; then
  python bench/bench_compile.py --shape llama_8b --batch 1 8 --tokens 64 --rounds 5 --out "$out"
fi
