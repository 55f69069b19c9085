"""The engine's warm-up (every prefill bucket, KV window and decode batch size compiled) with its
forwards compiled on N threads against one, each in a fresh process (no compile cache shared).

Random weights of a preset's shapes (serve.bench's configs). Prints one row per thread count:
the warm-up's seconds and its ratio to the first count's, measured in the same run, the seconds
the step variants (Engine.WARM_VARIANTS) then compile while the engine idles, and the served
decode step after it with every slot busy (on a GPU each compile also autotunes its XLA
gemms by running them; side by side, those timings share one device and could pick worse
kernels, which the step time would show).

    python benchmarks/engine_warmup.py --model Qwen3-30B-A3B-FP8 --context 16384 --slots 4 --threads 1,8
    python benchmarks/engine_warmup.py --model tiny --context 512 --slots 4 --threads 1,2   # CPU: works
"""

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def warmup_seconds(model: str, context: int, slots: int, threads: int, layers: int | None = None) -> dict:
    """In this process: build the model, then an Engine with COMPILE_THREADS = threads, then
    time its decode step with every slot running.
    -> {"threads", "warmup_s", "variants_s", "forwards", "step_ms"} (forwards: prefill buckets +
    windows x batch sizes; variants_s: the step variants compiled afterwards while idle)."""
    import numpy as np

    import qwen3_jax
    from benchmarks.engine_decode import decode_ms
    from serve.bench import resolve_bench_config
    from serve.engine import Engine

    cfg = resolve_bench_config(model, layers)
    m = qwen3_jax.random_model(cfg, dtype="bfloat16")
    Engine.COMPILE_THREADS = threads
    t0 = time.perf_counter()
    engine = Engine(m, context_length=context, max_running_requests=slots, progress=False)
    seconds = time.perf_counter() - t0
    forwards = len(engine._prefill_forms()) + len(engine.windows) * len(engine.decode_batch_sizes)
    t0 = time.perf_counter()
    engine.variants_warm.wait()   # its idle compiles (Engine.WARM_VARIANTS, after the warm-up timed) stay out of the step's
    variants_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, cfg.vocab_size, min(64, context // 4)).tolist() for _ in range(slots)]
    step_ms, _, _ = decode_ms(engine, prompts, tokens=min(32, context // 4))
    engine.shutdown()
    return {"threads": threads, "warmup_s": seconds, "variants_s": variants_s, "forwards": forwards, "step_ms": step_ms}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="Qwen3-30B-A3B-FP8", help="a serve.bench preset (random weights), or tiny")
    p.add_argument("--context", type=int, default=16384, help="the engine's context length")
    p.add_argument("--slots", type=int, default=4, help="max running requests (KV-cache slots)")
    p.add_argument("--layers", type=int, default=None, help="build only N layers")
    p.add_argument("--threads", default="1,8", help="compile thread counts, comma-separated; the first is the baseline")
    p.add_argument("--_child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child is not None:   # one measurement, reported as JSON on the last line
        print(json.dumps(warmup_seconds(args.model, args.context, args.slots, args._child, args.layers)), flush=True)
        return None
    counts = [int(t) for t in args.threads.split(",") if t]
    if not counts or min(counts) < 1:
        p.error(f"--threads {args.threads!r}: give positive counts, e.g. 1,8")
    rows = []
    for n in counts:
        cmd = [sys.executable, os.path.abspath(__file__), "--model", args.model, "--context", str(args.context),
               "--slots", str(args.slots), "--_child", str(n)] + (["--layers", str(args.layers)] if args.layers else [])
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if done.returncode:
            raise SystemExit(f"the {n}-thread run failed:\n{done.stderr[-2000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"{args.model}, context {args.context}, {args.slots} slots, {rows[0]['forwards']} forwards; "
          f"cpus {os.cpu_count()}; each count in a fresh process")
    print(f"{'threads':>8} {'warm-up s':>10} {'vs first':>9} {'then idle s':>12} {'step ms after':>14} {'vs first':>9}")
    for r in rows:
        print(f"{r['threads']:>8} {r['warmup_s']:>10.1f} {r['warmup_s'] / rows[0]['warmup_s']:>8.2f}x {r['variants_s']:>12.1f}"
              f" {r['step_ms']:>14.3f} {r['step_ms'] / rows[0]['step_ms']:>8.2f}x")
    return rows


if __name__ == "__main__":
    main()
