#!/usr/bin/env bash
# run 69 part 2: the argmax top-k A/B; tma_gemv again; the plain-XLA path at long prompts
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 QWEN3_BENCH_COMMIT=$(cat .commit)
QWEN3_JAX_TEST_GPU=1 timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels_router.py 2>&1 | tail -2 > $OUT/run69b_tests.txt
cat $OUT/run69b_tests.txt
timeout 240 python3 -m serve.bench --model Qwen3-30B-A3B-FP8 --batch 1,8 --prefill= --context 1024 \
  --steps 8 --reps 5 --single-step= --router-topk argmax,rounds,argmax --profile-batch 1 --out $OUT/run69b_ab.json > $OUT/run69b_ab.log 2>&1
echo "bench exit $?"
grep -E "topk|router_topk|^card|ceilings" $OUT/run69b_ab.log
timeout 150 python3 benchmarks/tma_gemv.py > $OUT/run69_tma_gemv.txt 2>&1; echo "tma exit $?"
grep -v Warning $OUT/run69_tma_gemv.txt | tail -8
