#!/usr/bin/env bash
# run 69 part 1: GPU tests + the top-k A/B
set -u
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 QWEN3_BENCH_COMMIT=$(cat .commit)
nvidia-smi -L > $OUT/card.txt
QWEN3_JAX_TEST_GPU=1 timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_router.py tests/test_attention.py -m "gpu or not gpu" 2>&1 | tail -15 > $OUT/run69_tests.txt
QWEN3_JAX_TEST_GPU=1 timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels.py -k "gpu_model" 2>&1 | tail -8 >> $OUT/run69_tests.txt
cat $OUT/run69_tests.txt
timeout 300 python3 -m serve.bench --model Qwen3-30B-A3B-FP8,Qwen3-30B-A3B --batch 1,8 --prefill= --context 1024 \
  --steps 8 --reps 5 --single-step= --router-topk rank,rounds,rank --profile-batch 1 --out $OUT/run69_ab.json > $OUT/run69_ab.log 2>&1
echo "bench exit $?"
grep -E "topk|router_topk|^card|ceilings" $OUT/run69_ab.log
