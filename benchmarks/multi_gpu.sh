#!/usr/bin/env bash
# Issue 11 on a 2- or 4-GPU machine: sharding equivalence on real NCCL collectives, decode speed of
# tp-only vs expert-parallel meshes next to one card (same run), and a served request on tp=2,ep=2.
# Usage (device machine): bash benchmarks/multi_gpu.sh $OUT
# Optional: MESHES="tp=1 tp=4" (bench meshes; "none" skips), TESTS="<pytest -k expr>" ("none" skips),
# LAYERS=8, MODELS="Qwen3-30B-A3B Qwen3-30B-A3B-FP8", TIMELINE=1 (benchmarks/mesh_timeline.py at
# batch 1 on each mesh: every GPU's compute / collective / idle time), SKIP_SERVE=1.
# The test file takes ~16 s a case on 2 H200s (run 134: 19 cases in 308 s), so give it its time.
# The served request needs the project's HTTP modules and the openai client, which the device
# image lacks and cannot download: build a wheel folder here and carry it as `wheels`, e.g.
#   pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#     -d wheels fastapi uvicorn prometheus-client openai "outlines-core<0.3"
# (run 137); without them the serve step is skipped with a message.
set -u
OUT=${1:-/tmp/out}; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
N=$(nvidia-smi -L | wc -l)
nvidia-smi -L | tee "$OUT/cards.txt"
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" | tee -a "$OUT/cards.txt"

if [ "${TESTS:-}" != "none" ]; then
echo "== equivalence tests"
QWEN3_JAX_TEST_GPU=1 timeout ${TEST_TIMEOUT:-420} python3 -m pytest -q -s -p no:cacheprovider tests/test_multi_gpu.py ${TESTS:+-k "$TESTS"} 2>&1 \
  | grep -E "rel err|passed|failed|skipped|Error|error" | tee "$OUT/equivalence.txt"
fi

echo "== decode speed, Qwen3-30B-A3B shapes, ${LAYERS:=8} layers"
if [ -z "${MESHES:-}" ]; then
  MESHES="tp=1 tp=2 ep=2"
  [ "$N" -ge 4 ] && MESHES="$MESHES tp=4 ep=4 tp=2,ep=4"
fi
[ "$MESHES" = "none" ] && MESHES=""
for model in ${MODELS:-Qwen3-30B-A3B}; do
for m in $MESHES; do
  tag="${model#Qwen3-30B-A3B}_${m//[=,]/_}"
  timeout 90 python3 -m serve.bench --model "$model" --mesh "$m" --layers "$LAYERS" --batch 1,8,64 \
    --prefill '' --steps 8 --reps 3 --single-step '' --memory-check --markdown --out "$OUT/bench$tag.json" \
    > "$OUT/bench$tag.log" 2>&1
  echo "-- $model $m (exit $?)"; grep -E "^\| (on|off) \||weights planned|peak over" "$OUT/bench$tag.log"
  if [ -n "${TIMELINE:-}" ] && [ "$m" != "tp=1" ]; then
    timeout 60 python3 benchmarks/mesh_timeline.py --model "$model" --mesh "$m" --layers "$LAYERS" --threads 2 --names 4 \
      2>&1 | grep -v "^WARNING\|^I0000\|^W0000" | tee "$OUT/timeline$tag.txt"
  fi
done
done

[ -n "${SKIP_SERVE:-}" ] && exit 0
if ! python3 -c "import uvicorn, fastapi, openai" 2>/dev/null && [ -d wheels ]; then
  python3 -m pip install -q --no-index --find-links wheels fastapi uvicorn prometheus-client openai "outlines-core<0.3"
fi
if ! python3 -c "import uvicorn, fastapi, openai" 2>/dev/null; then
  echo "== serve skipped: uvicorn/fastapi/openai missing (see the wheel folder in this script's header)"; exit 0
fi
echo "== python -m serve --mesh tp=2,ep=2, one OpenAI client request"
python3 -m serve --mesh tp=2,ep=2 --port 30123 --context-length 1024 --max-running-requests 8 > "$OUT/serve.log" 2>&1 &
PID=$!
for i in $(seq 1 120); do curl -sf http://127.0.0.1:30123/health >/dev/null && break; sleep 1; done
python3 - <<'PY' 2>&1 | tee "$OUT/client.txt"
from openai import OpenAI
c = OpenAI(base_url="http://127.0.0.1:30123/v1", api_key="none")
r = c.completions.create(model=c.models.list().data[0].id, prompt="The mesh is", max_tokens=16, temperature=0)
print("completion:", repr(r.choices[0].text), "usage:", r.usage)
PY
kill -INT $PID; wait $PID; echo "server exit $?"
grep -E "mesh:|weights:|kv cache|ready" "$OUT/serve.log" | tee -a "$OUT/client.txt"
