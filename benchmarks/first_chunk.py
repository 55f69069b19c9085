"""A served prompt's time to first token when it fits one prefill chunk: the engine's first-chunk
form (attention over the chunk's own K/V, cuDNN's causal kernel: Engine.FRESH_MIN_TOKENS) against
the chunk kernel reading them back from the cache (FRESH_MIN_TOKENS 0), one process, one model.

Random weights of a preset's shapes (serve.bench's configs), token-id prompts, greedy,
max_tokens=1; an Engine per setting (its warm-up and idle compiles done first), each prompt
length timed --reps times on fresh prompts (the median is printed), the settings in the order
given: the first is the baseline (same run), and one given again last gives the noise.

    python benchmarks/first_chunk.py --model Qwen3-30B-A3B-FP8 --prompts 1000,2000 --chunk 2048 --fresh-min 1024,0,1024
    python benchmarks/first_chunk.py --model tiny --context 256 --prompts 60 --chunk 64 --fresh-min 32,0   # CPU: works (no cuDNN: one form)
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> list[tuple[int, list[float]]]:
    """-> [(FRESH_MIN_TOKENS, [median ms per prompt length])], in the order run."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="Qwen3-30B-A3B-FP8", help="a serve.bench preset (random weights), or tiny")
    p.add_argument("--context", type=int, default=4096, help="the engine's context length")
    p.add_argument("--prompts", default="1000,2000", help="prompt lengths, comma-separated (each <= --chunk)")
    p.add_argument("--chunk", type=int, default=2048, help="the engine's chunked_prefill_size")
    p.add_argument("--fresh-min", default="1024,0,1024",
                   help="Engine.FRESH_MIN_TOKENS per engine, comma-separated (0: off); the first is the baseline")
    p.add_argument("--reps", type=int, default=5, help="prompts timed per length and setting")
    p.add_argument("--layers", type=int, default=None, help="build only N layers")
    args = p.parse_args(argv)
    lengths = [int(v) for v in args.prompts.split(",") if v]
    settings = [int(v) for v in args.fresh_min.split(",") if v]
    if not lengths or max(lengths) > args.chunk or not settings:
        p.error(f"--prompts {args.prompts!r}: give lengths up to --chunk {args.chunk}, and --fresh-min values")

    import jax
    import numpy as np

    import qwen3_jax
    from serve.bench import resolve_bench_config
    from serve.engine import Engine
    from serve.sampling import SamplingParams

    cfg = resolve_bench_config(args.model, args.layers)
    model = qwen3_jax.random_model(cfg, dtype="bfloat16")
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    rng = np.random.default_rng(0)
    print(f"device {jax.devices()[0].device_kind}; {args.model}, context {args.context}, chunk {args.chunk}; "
          f"ms to the first token, median of {args.reps}")
    rows, before = [], Engine.FRESH_MIN_TOKENS
    try:
        for least in settings:
            Engine.FRESH_MIN_TOKENS = least
            engine = Engine(model, context_length=args.context, max_running_requests=2,
                            chunked_prefill_size=args.chunk, progress=False)
            engine.variants_warm.wait()   # the idle compiles stay out of the timings
            row = []
            for n in lengths:
                times = []
                for _ in range(args.reps):
                    prompt = rng.integers(0, cfg.vocab_size, n).tolist()
                    t0 = time.perf_counter()
                    engine.generate(prompt, params)
                    times.append(1e3 * (time.perf_counter() - t0))
                row.append(statistics.median(times))
            engine.shutdown()
            rows.append((least, row))
            cells = "  ".join(f"{n} tokens {ms:8.2f} ({ms / b:.3f}x)" for n, ms, b in zip(lengths, row, rows[0][1]))
            print(f"  fresh-min {least:>5}: {cells}", flush=True)
    finally:
        Engine.FRESH_MIN_TOKENS = before
    return rows


if __name__ == "__main__":
    main()
