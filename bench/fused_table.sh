#!/usr/bin/env bash
# The fused tables of docs/fused.md, one GPU:
#   bash bench/fused_table.sh [kernel|families|families-8b|prefill-8b|prefill-1b|pdl-8b|cli-8b|1b|8b|all] [out-dir]
# kernel: bench/lut3_kernel.py (every matrix shape against cuBLAS and the exactness reference, M=1 and 8, with the
#         diagnostic variants that split the time);
# families: the same on the 8B matrices (and 1B's gate/up) at 4/8/16 warps, every build of every kernel family
#         (lane, ballot, chunk, prefetch) timed side by side (~6 min);
# families-8b: the families inside the whole 8B model, b=1, arms alternated (bench_compile.py; ~7 min); each
#         family's logits must equal fused_compiled's. (Two device calls: each fits in 10 minutes alone.)
# prefill-8b, prefill-1b: the short prefill's two routes in the whole model, b=1, 64 tokens, --split: dense compiled,
#         the default (cache.prefill_tokens=32: one launch of the wide build per layer, no decode) with its exactness
#         reference, and the decode route (prefill_tokens=0: each layer decoded for F.linear). 8B: 3 paired rounds
#         (~6 min), then bench/prefill_host.py's forward and one-token arms (~2 min); 1B: 7 rounds (~2 min).
# pdl-8b: programmatic dependent launch (cache.pdl=true) against plain launches in the whole 8B model, b=1, 64 tokens,
#         7 paired rounds with dense compiled (~5 min); fused_pdl_compiled's logits must equal fused_compiled's.
# cli-8b: issue 12's end-to-end check through the CLI: experiment=fused on the 8B shape, compiled, baseline and
#         paired rounds included (results.json and the log under <out-dir>/cli_8b; no artifact cache: 11.6 GB).
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
if [[ "$which" == families ]]; then
  python bench/lut3_kernel.py --only 8b.q_o,8b.k_v,8b.gate_up,8b.down,8b.lm_head,1b.gate_up --ms 1,8 --warps 4,8,16 \
    --budget-s 420 --out "$out/lut3_families.jsonl"
fi
if [[ "$which" == families-8b ]]; then
  python bench/bench_compile.py --shape llama_8b --batch 1 --tokens 64 --rounds 5 \
    --arms dense_compiled fused_lane_compiled fused_ballot_compiled fused_chunk_compiled fused_prefetch_compiled --out "$out/fused_families_8b.jsonl"
fi
if [[ "$which" == prefill-8b ]]; then
  python bench/bench_compile.py --shape llama_8b --batch 1 --tokens 64 --rounds 3 --split \
    --arms dense_compiled fused_decoded_compiled fused_compiled fused_ref_compiled --out "$out/fused_prefill_8b.jsonl"
  python bench/prefill_host.py --shape llama_8b --rounds 10 --out "$out/prefill_host_8b.jsonl"
fi
if [[ "$which" == prefill-1b ]]; then
  python bench/bench_compile.py --shape llama_1b --batch 1 --tokens 64 --rounds 7 --split \
    --arms dense_compiled fused_decoded_compiled fused_compiled fused_ref_compiled --out "$out/fused_prefill_1b.jsonl"
fi
if [[ "$which" == pdl-8b ]]; then
  python bench/bench_compile.py --shape llama_8b --batch 1 --tokens 64 --rounds 7 --split \
    --arms dense_compiled fused_compiled fused_pdl_compiled --out "$out/fused_pdl_8b.jsonl"
fi
if [[ "$which" == cli-8b ]]; then
  python -m harness experiment=fused model=llama_8b_synthetic generate.compile=true logger=none \
    hydra.run.dir="$out/cli_8b" compress.artifact_cache=false 2>&1 | tee "$out/cli_8b.log"
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
