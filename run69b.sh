#!/usr/bin/env bash
# run 69 part 2: tma_gemv again; the plain-XLA path at long prompts
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 QWEN3_BENCH_COMMIT=$(cat .commit)
timeout 200 python3 benchmarks/tma_gemv.py > $OUT/run69_tma_gemv.txt 2>&1; echo "tma exit $?"
cat $OUT/run69_tma_gemv.txt | grep -v Warning | tail -12
timeout 330 python3 -m serve.bench --model Qwen3-30B-A3B --layers 8 --batch= --prefill 8192,32768 --kernels off \
  --reps 2 --out $OUT/run69_xla_prefill.json > $OUT/run69_xla_prefill.log 2>&1; echo "xla prefill exit $?"
tail -8 $OUT/run69_xla_prefill.log
