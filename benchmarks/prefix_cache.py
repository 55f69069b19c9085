"""What prefix caching saves a conversation's next turn: time to its first token with the engine's
per-slot prefix cache against the same engine without it, in one process.

Random weights of a preset's shapes (serve.bench's configs), token-id prompts, greedy. Each
engine serves turn 1 (a P-token prompt, R tokens of reply), then turn 2 = turn 1's prompt + reply
+ M new tokens with max_tokens=1; the figure is turn 2's wall time (its prefill and one token),
the median of --reps conversations, each on fresh prompts. With the cache, turn 2 prefills M + 1
tokens instead of P + R + M.

--burst N: instead, N requests sent at once, each a shared P-token system prompt + M tokens of
its own, max_tokens=1; the figure is the wall time until the last one's first token. With the
cache the system prompt is prefilled once and copied into the other N - 1 slots.

    python benchmarks/prefix_cache.py --model Qwen3-30B-A3B-FP8 --context 16384 --prompt 8192 --reply 256 --new 64
    python benchmarks/prefix_cache.py --model Qwen3-30B-A3B-FP8 --context 8192 --prompt 4096 --new 64 --burst 8
    python benchmarks/prefix_cache.py --model tiny --context 256 --prompt 96 --reply 16 --new 8 --reps 2   # CPU: works
"""

import argparse
import functools
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def next_turn_seconds(engine, rng, vocab: int, prompt: int, new: int, reply: int) -> tuple[float, int]:
    """One conversation: -> (seconds for turn 2's first token, its prompt tokens found cached)."""
    from serve import SamplingParams

    first = rng.integers(0, vocab, prompt).tolist()
    out = engine.generate(first, SamplingParams(max_tokens=reply, temperature=0, ignore_eos=True))[0]
    turn = first + out.token_ids + rng.integers(0, vocab, new).tolist()
    t0 = time.perf_counter()
    second = engine.generate(turn, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))[0]
    return time.perf_counter() - t0, second.cached_tokens


def burst_seconds(engine, rng, vocab: int, prompt: int, new: int, n: int) -> tuple[float, int]:
    """n requests at once, a shared system prompt each + `new` tokens of their own: -> (seconds
    until the last one's first token, their prompt tokens found cached)."""
    from serve import SamplingParams

    system = rng.integers(0, vocab, prompt).tolist()
    prompts = [system + rng.integers(0, vocab, new).tolist() for _ in range(n)]
    t0 = time.perf_counter()
    outs = engine.generate(prompts, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    return time.perf_counter() - t0, sum(o.cached_tokens for o in outs)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="Qwen3-30B-A3B-FP8", help="a serve.bench preset (random weights)")
    p.add_argument("--context", type=int, default=16384, help="the engine's context length")
    p.add_argument("--prompt", type=int, default=8192, help="turn 1's prompt tokens")
    p.add_argument("--reply", type=int, default=256, help="turn 1's reply tokens")
    p.add_argument("--new", type=int, default=64, help="turn 2's new tokens")
    p.add_argument("--slots", type=int, default=4, help="max running requests (KV-cache slots)")
    p.add_argument("--reps", type=int, default=3, help="conversations per engine (the median is reported)")
    p.add_argument("--mesh", default="tp=1", help="device mesh, e.g. tp=2")
    p.add_argument("--layers", type=int, default=None, help="build only N layers")
    p.add_argument("--burst", type=int, default=0,
                   help="N > 0: N requests at once sharing a --prompt-token system prompt (slots raised to N)")
    args = p.parse_args(argv)
    if args.burst:
        args.slots = max(args.slots, args.burst)
        if args.prompt + args.new >= args.context:
            p.error(f"--prompt + --new ({args.prompt + args.new}) must stay below --context {args.context}")
    elif args.prompt + args.reply + args.new >= args.context:
        p.error(f"--prompt + --reply + --new ({args.prompt + args.reply + args.new}) must stay below --context "
                f"{args.context}: raise --context or shorten the turns")

    import jax
    import numpy as np

    import qwen3_jax
    from serve.bench import resolve_bench_config
    from serve.engine import Engine

    cfg = resolve_bench_config(args.model, args.layers)
    model = qwen3_jax.random_model(cfg, mesh=args.mesh, dtype="bfloat16")
    what = (f"{args.burst} requests at once, a {args.prompt}-token system prompt + {args.new} tokens each"
            if args.burst else f"turn 1: {args.prompt} prompt + {args.reply} reply tokens; turn 2 adds {args.new}")
    print(f"device {jax.devices()[0].device_kind}; {args.model}, mesh {args.mesh}, context {args.context}; {what}",
          flush=True)
    seconds = {}
    for cached in (False, True):
        t0 = time.perf_counter()
        engine = Engine(model, context_length=args.context, max_running_requests=args.slots,
                        prefix_caching=cached, progress=False)
        print(f"  engine (prefix caching {'on' if cached else 'off'}) ready in {time.perf_counter() - t0:.1f} s",
              flush=True)
        engine.variants_warm.wait()   # its idle compiles (Engine.WARM_VARIANTS) stay out of the timings
        try:
            rng = np.random.default_rng(0)
            once = (functools.partial(burst_seconds, n=args.burst) if args.burst else
                    functools.partial(next_turn_seconds, reply=args.reply))
            once(engine, rng, cfg.vocab_size, prompt=args.prompt, new=args.new)   # warm
            runs = [once(engine, rng, cfg.vocab_size, prompt=args.prompt, new=args.new) for _ in range(args.reps)]
        finally:
            engine.shutdown()
        seconds[cached] = statistics.median(s for s, _ in runs)
        what = f"the last of {args.burst} first tokens" if args.burst else "turn 2's first token"
        total = args.burst * (args.prompt + args.new) if args.burst else args.prompt + args.reply + args.new
        print(f"  prefix caching {'on ' if cached else 'off'}: {what} in {1e3 * seconds[cached]:9.1f} ms "
              f"({runs[-1][1]} of {total} prompt tokens cached)", flush=True)
    print(f"  with the cache: {seconds[False] / seconds[True]:.1f}x faster", flush=True)
    return seconds


if __name__ == "__main__":
    main()
