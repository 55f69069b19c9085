#!/usr/bin/env bash
# run 69 part 3: the plain-XLA path (kernels off) at long prompts, 8 layers
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 QWEN3_BENCH_COMMIT=$(cat .commit)
timeout 400 python3 -m serve.bench --model Qwen3-30B-A3B --layers 8 --batch= --prefill 8192,32768 --kernels off \
  --reps 2 --out $OUT/run69_xla_prefill.json > $OUT/run69_xla_prefill.log 2>&1; echo "xla prefill exit $?"
tail -8 $OUT/run69_xla_prefill.log
