"""What a served request pays per decode step: the engine (serve/engine.py) with its decode batch
sizes, with and without the overlap scheduler, against the engine with one shape (every slot in
every step) and no overlap, in one process.

Random weights of a preset's shapes (serve.bench's configs), token-id prompts, greedy. Per
setting and number of concurrent requests R: the engine generates T tokens for each of R
prompts, then 1 token; (time(T) - time(1)) / (T - 1) is the decode time per step with the
prefill taken out, next to the batch sizes the steps ran at. The one-shape serial engine is the
baseline measured in the same run; the serial engine with the same sizes isolates the overlap.

    python benchmarks/engine_decode.py --model Qwen3-30B-A3B-FP8 --context 8192 --slots 16
    python benchmarks/engine_decode.py --model tiny --context 128 --prompt 16 --slots 4 --sizes 1,2 --tokens 8   # CPU: works

--sample, --logprobs N and --presence-penalty P set every request's sampling; each setting in a
process of its own against a greedy run gives what it adds to a served step.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# --sample: Qwen3's generation_config (the engine's top-64 sampler), seeded so engines compare
QWEN3_SAMPLING = dict(temperature=0.6, top_p=0.95, top_k=20, seed=0)


def decode_ms(engine, prompts, tokens: int, sampling: dict | None = None) -> tuple[float, dict, list]:
    """-> (ms per decode step for these prompts at once, {batch size: steps}, token ids per prompt).
    sampling: SamplingParams fields (default greedy)."""
    from serve import SamplingParams

    def timed(n):
        before = dict(engine.decode_batches)
        t0 = time.perf_counter()
        outs = engine.generate(prompts, SamplingParams(max_tokens=n, ignore_eos=True,
                                                       **(sampling or dict(temperature=0))))
        dt = time.perf_counter() - t0
        assert all(len(o.token_ids) == n for o in outs)
        used = {b: k - before.get(b, 0) for b, k in engine.decode_batches.items() if k > before.get(b, 0)}
        return dt, used, [o.token_ids for o in outs]

    timed(tokens)                      # warm: first-call costs out of the figures
    one, _, _ = timed(1)
    full, used, ids = timed(tokens)
    return 1e3 * (full - one) / (tokens - 1), used, ids


def model_step_ms(model, batch: int, context: int, position: int, steps: int = 8, reps: int = 5) -> float:
    """The model's decode step alone, as serve.bench times it (one jitted call runs `steps`
    greedy steps, so the host never waits; random tokens and K/V, so rows route to different
    experts as the engine's distinct prompts do): what an engine step could cost. ms per step."""
    import jax
    import jax.numpy as jnp

    from serve.bench import fill_cache, make_decode, median_seconds

    fn = make_decode(model.graphdef, steps)
    tok = jax.random.randint(jax.random.key(batch), (batch,), 0, model.config.vocab_size, jnp.int32)
    pos = jnp.full(batch, position, jnp.int32)
    holder = {"cache": fill_cache(model.init_cache(batch, context), jax.random.key(batch + 1))}

    def call():
        out, holder["cache"] = fn(model.state, tok, pos, holder["cache"])
        return out

    return 1e3 * median_seconds(call, reps) / steps


def profile_generate(engine, prompt, tokens: int, top_kernels: int = 25):
    """Trace one request's `tokens` tokens: kernels and device-busy time per decode step against
    the span from the first kernel to the last (prefill included, so busy/span is a lower bound
    for the decode steps). Idle time is the device waiting for the host."""
    from serve import SamplingParams
    from qwen3_jax.kernels.tune import device_timeline

    tl = device_timeline(lambda: engine.generate(prompt, SamplingParams(max_tokens=tokens, temperature=0,
                                                                        ignore_eos=True))[0].token_ids)
    if tl is None or tl["first_ns"] is None:
        print("    profile: no GPU kernels traced", flush=True)
        return
    busy = sum(d for _, d in tl["by_name"].values()) / 1e3
    span = (tl["last_ns"] - tl["first_ns"]) / 1e3
    n = sum(k for k, _ in tl["by_name"].values())
    print(f"    profile, 1 request x {tokens} tokens: {n / tokens:.0f} kernels/step, device busy {busy / tokens:.0f} "
          f"us/step of a {span / tokens:.0f} us/step span ({100 * busy / span:.0f}% busy)", flush=True)
    top = sorted(tl["by_name"].items(), key=lambda kv: -kv[1][1])[:top_kernels]
    for name, (count, ns) in top:
        print(f"      {ns / 1e3 / tokens:9.1f} us/step  x {count / tokens:6.1f}  {name[:90]}", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="Qwen3-30B-A3B-FP8", help="a serve.bench preset (random weights)")
    p.add_argument("--context", type=int, default=8192, help="the engine's context length")
    p.add_argument("--slots", type=int, default=16, help="max running requests (KV-cache slots)")
    p.add_argument("--requests", default="1,4,16", help="concurrent requests, comma-separated")
    p.add_argument("--tokens", type=int, default=64, help="tokens generated per request")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens per request")
    p.add_argument("--sizes", default=None,
                   help="decode batch sizes of the second engine, comma-separated (default: the engine's own)")
    p.add_argument("--profile", action="store_true",
                   help="trace one request's generation on each engine: device busy time against the span")
    p.add_argument("--only-overlap", action="store_true",
                   help="run only the engine with batch sizes and overlap (no baselines)")
    p.add_argument("--mesh", default="tp=1", help="device mesh, e.g. tp=2 or ep=2 (random weights created sharded)")
    p.add_argument("--layers", type=int, default=None, help="build only N layers")
    p.add_argument("--sample", action="store_true",
                   help="sample as Qwen3's generation_config asks (temperature 0.6, top_p 0.95, top_k 20; seeded) "
                        "instead of greedy")
    p.add_argument("--logprobs", type=int, default=None, metavar="N",
                   help="every request asks for logprobs with N alternatives (the steps' logprobs variant)")
    p.add_argument("--presence-penalty", type=float, default=0.0, metavar="P",
                   help="every request asks for this presence penalty (the steps' penalties variant)")
    p.add_argument("--top-k", choices=("pruned", "lax"), default=None,
                   help="how the top-64 sampler takes a row's best 64 (serve.sampling.TOP_K; default: the "
                        "module's): pruned by block maxima, or one lax.top_k over the whole row (the "
                        "sampler before run 105)")
    args = p.parse_args(argv)
    if args.prompt + args.tokens >= args.context:
        p.error(f"--prompt {args.prompt} + --tokens {args.tokens} must stay below --context {args.context}: "
                f"raise --context or shorten the prompt")

    import jax
    import numpy as np

    import qwen3_jax
    from serve.bench import resolve_bench_config
    from serve.engine import Engine

    if args.top_k is not None:   # read when the engine traces its sampler
        from serve import sampling as sampling_module
        sampling_module.TOP_K = args.top_k
    cfg = resolve_bench_config(args.model, args.layers)
    model = qwen3_jax.random_model(cfg, mesh=args.mesh, dtype="bfloat16")
    sampling = dict(QWEN3_SAMPLING if args.sample else dict(temperature=0), logprobs=args.logprobs,
                    presence_penalty=args.presence_penalty)
    rng = np.random.default_rng(0)
    counts = [int(r) for r in args.requests.split(",") if r]
    prompts = [rng.integers(0, cfg.vocab_size, args.prompt).tolist() for _ in range(max(counts))]
    print(f"device {jax.devices()[0].device_kind}; {args.model}, mesh {args.mesh}, context {args.context}, "
          f"{args.slots} slots, {args.prompt}-token prompts, {args.tokens} tokens each, "
          f"{'sampled' if args.sample else 'greedy'} {sampling}"
          f"{'' if args.top_k is None else f', top-k form {args.top_k}'}", flush=True)
    results, tokens = {}, {}
    from serve.engine import decode_windows
    window = next(w for w in decode_windows(args.context) if w > args.prompt + args.tokens)
    alone = {r: model_step_ms(model, min(r, args.slots), window, args.prompt + args.tokens // 2) for r in counts}
    for r, ms in alone.items():
        print(f"  model step alone, batch {min(r, args.slots)}, KV window {window}: {ms:.3f} ms", flush=True)
    sizes_asked = [int(b) for b in args.sizes.split(",")] if args.sizes else None
    settings = (("one shape", [args.slots], False), ("batch sizes", sizes_asked, False),
                ("batch sizes + overlap", sizes_asked, True))
    if args.only_overlap:
        settings = settings[2:]
    for name, sizes, overlap in settings:
        engine = Engine(model, context_length=args.context, max_running_requests=args.slots,
                        decode_batch_sizes=sizes, overlap=overlap, progress=False)
        engine.variants_warm.wait()   # its idle compiles (Engine.WARM_VARIANTS) stay out of the timings
        try:
            print(f"  {name}: compiled sizes {engine.decode_batch_sizes}", flush=True)
            if args.profile:
                profile_generate(engine, prompts[0], args.tokens)
            for r in counts:
                ms, used, tokens[name, r] = decode_ms(engine, prompts[:r], args.tokens, sampling)
                results[name, r] = ms
                print(f"    {r:3d} requests: {ms:8.3f} ms per decode step, steps by batch size {used}", flush=True)
        finally:
            engine.shutdown()
    if len(settings) < 3:
        return results
    for r in counts:   # same sizes, same batches (no stop ids): overlap must not change a token
        same = tokens["batch sizes", r] == tokens["batch sizes + overlap", r]
        print(f"  {r:3d} requests: tokens with overlap equal the serial engine's: {same}", flush=True)
    for r in counts:
        base, sized, both = (results[name, r] for name, _, _ in settings)
        print(f"  {r:3d} requests: one shape {base:.3f} ms per step; batch sizes {sized:.3f} ms ({base / sized:.2f}x); "
              f"+ overlap {both:.3f} ms ({base / both:.2f}x, overlap alone {sized / both:.3f}x); "
              f"the model step alone {alone[r]:.3f} ms = {100 * alone[r] / both:.0f}% of the served step", flush=True)
    return results


if __name__ == "__main__":
    main()
