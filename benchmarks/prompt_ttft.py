"""A served prompt's time to first token under the engine's prefill forms, one process, one model:

--fresh-min: Engine.FRESH_MIN_TOKENS, a prompt's first chunk over its own K/V (cuDNN's causal
  kernel) from that many tokens, 0 off (the chunk kernel reading them back from the cache);
--split-min: kernels/prefill_attention.SPLIT_MIN_TOKENS, a continuing chunk of that many tokens
  or more as two cuDNN calls merged by their log-sum-exps, `off` (the chunk kernel). Prompts
  longer than --chunk take several chunks, so this is where it shows.

Random weights of a preset's shapes (serve.bench's configs), token-id prompts, greedy,
max_tokens=1; an Engine per setting (its warm-up and idle compiles done first), each prompt
length timed --reps times on fresh prompts (the median is printed), the settings in the order
given: the first is the baseline (same run), and one given again last gives the noise.
(Formerly benchmarks/first_chunk.py, --fresh-min only.)

    python benchmarks/prompt_ttft.py --model Qwen3-30B-A3B-FP8 --prompts 1000,2000 --chunk 2048 --fresh-min 512,0,512
    python benchmarks/prompt_ttft.py --model Qwen3-30B-A3B-FP8 --context 16384 --prompts 8000 --chunk 2048 --split-min 512,off,512
    python benchmarks/prompt_ttft.py --model tiny --context 256 --prompts 60 --chunk 64 --fresh-min 32,0   # CPU: works (no cuDNN: one form)
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> list[tuple[int | None, list[float]]]:
    """-> [(setting, [median ms per prompt length])], in the order run (split-min `off`: None)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="Qwen3-30B-A3B-FP8", help="a serve.bench preset (random weights), or tiny")
    p.add_argument("--context", type=int, default=4096, help="the engine's context length")
    p.add_argument("--prompts", default="1000,2000",
                   help="prompt lengths, comma-separated (with --fresh-min each <= --chunk)")
    p.add_argument("--chunk", type=int, default=2048, help="the engine's chunked_prefill_size")
    knob = p.add_mutually_exclusive_group(required=True)
    knob.add_argument("--fresh-min", help="Engine.FRESH_MIN_TOKENS per engine, comma-separated (0: off); the first "
                                          "is the baseline")
    knob.add_argument("--split-min", help="prefill_attention.SPLIT_MIN_TOKENS per engine, comma-separated (off: the "
                                          "chunk kernel); the first is the baseline")
    p.add_argument("--reps", type=int, default=5, help="prompts timed per length and setting")
    p.add_argument("--layers", type=int, default=None, help="build only N layers")
    args = p.parse_args(argv)
    lengths = [int(v) for v in args.prompts.split(",") if v]
    values = args.fresh_min if args.fresh_min is not None else args.split_min
    try:
        settings = [None if v == "off" else int(v) for v in values.split(",") if v]
    except ValueError:
        p.error(f"{values!r}: give integers (`off` for --split-min), comma-separated")
    if not lengths or not settings or (args.fresh_min is not None and (max(lengths) > args.chunk or None in settings)):
        p.error(f"--prompts {args.prompts!r}: give lengths (up to --chunk {args.chunk} with --fresh-min) and "
                f"the setting's values (integers; `off` for --split-min)")
    if max(lengths) >= args.context:
        p.error(f"--prompts: each length must be below --context {args.context}")

    import jax
    import numpy as np

    import qwen3_jax
    from qwen3_jax.kernels import prefill_attention
    from serve.bench import resolve_bench_config
    from serve.engine import Engine
    from serve.sampling import SamplingParams

    cfg = resolve_bench_config(args.model, args.layers)
    model = qwen3_jax.random_model(cfg, dtype="bfloat16")
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    rng = np.random.default_rng(0)
    name = "fresh-min" if args.fresh_min is not None else "split-min"
    print(f"device {jax.devices()[0].device_kind}; {args.model}, context {args.context}, chunk {args.chunk}; "
          f"ms to the first token, median of {args.reps}")
    rows, before = [], (Engine.FRESH_MIN_TOKENS, prefill_attention.SPLIT_MIN_TOKENS)
    try:
        for value in settings:
            if args.fresh_min is not None:
                Engine.FRESH_MIN_TOKENS = value
            else:   # read while the engine's forwards trace: each engine compiles its own
                prefill_attention.SPLIT_MIN_TOKENS = value
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
            rows.append((value, row))
            cells = "  ".join(f"{n} tokens {ms:8.2f} ({ms / b:.3f}x)" for n, ms, b in zip(lengths, row, rows[0][1]))
            label = "off" if value is None else value
            print(f"  {name} {label:>5}: {cells}", flush=True)
    finally:
        Engine.FRESH_MIN_TOKENS, prefill_attention.SPLIT_MIN_TOKENS = before
    return rows


if __name__ == "__main__":
    main()
