set -x
nvidia-smi --query-gpu=name --format=csv
QWEN3_JAX_TEST_GPU=1 timeout 200 python3 -m pytest -q -m gpu tests/test_kernels.py -k "storage_order" 2>&1 | tail -15 | tee $OUT/run22_tests.txt
timeout 330 python3 benchmarks/gemv_order.py 2>&1 | grep -v Warning | tee $OUT/run22_sweep.txt
