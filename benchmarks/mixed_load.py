"""Which prefill chunk size serves a mixed load best: decode inter-token latency (ITL) of running
requests against long prompts' time to first token (TTFT) and throughput, per
`Engine(chunked_prefill_size=...)`, one process.

Random weights of a preset's shapes (serve.bench's configs), built once; token-id prompts,
greedy, ignore_eos. For each chunk size, a fresh Engine on that model, and on it, for each
--gap-ms:

    1. D decoders (short prompts, max_tokens = all the context left) start; once each has
       --solo-tokens tokens, their gaps so far give the ITL of decode alone (the "alone" column);
    2. at t0, P long prompts (--prompt tokens, --long-tokens each) arrive gap ms apart (0: at
       once) while the decoders keep decoding; t_end = the last long prompt's last token;
    3. the decoders are cancelled.

Figures (times are when the engine hands a token to its consumer, as a streaming client gets
it, on the scheduler thread): ITL median / p99 / max over the decoders' gaps ending in
(t0, t_end]; TTFT median of the long prompts (first token - submission, queueing included);
tokens/s = (the long prompts' prompt + generated tokens + the decoders' tokens in
(t0, t_end]) / (t_end - t0). Each row is also divided by the first chunk size's (the baseline,
same run); that size given again last gives the run-to-run noise of those ratios.

The engine prefills up to one chunk between two decode steps, so a decoder's gap is a decode
step plus the chunk that ran before it: larger chunks cost fewer, longer stalls. Spaced
arrivals (1000 ms for 8k prompts) leave the engine idle between prompts: latency; at once,
the prompts queue: prefill throughput and TTFT with queueing.

    python benchmarks/mixed_load.py --model Qwen3-30B-A3B-FP8 --context 10240 --decoders 16 --prompt 8192 --arrivals 4 --gap-ms 1000,0 --chunk-sizes 512,1024,2048,512 --compilation-cache /tmp/qwen3-xla
    python benchmarks/mixed_load.py --model tiny --context 256 --decoders 2 --decoder-prompt 16 --prompt 96 --arrivals 2 --gap-ms 30,0 --chunk-sizes 32,128 --solo-tokens 4 --long-tokens 4 --compilation-cache off   # CPU: works

Each fresh Engine compiles its steps again; with --compilation-cache (JAX's persistent cache, as
`python -m serve` uses it) the second and later engines load every step but their new top
prefill bucket from it.
"""

import argparse
import gc
import os
import shlex
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Timeline:
    """One request's submission time and the host time of each token it was handed."""

    def __init__(self):
        self.submitted = None
        self.times: list[float] = []   # one per generated token, perf_counter seconds
        self.finish_reason = None
        self.done = threading.Event()

    def on_output(self, out):
        """The engine's callback (scheduler thread): one RequestOutput delta."""
        now = time.perf_counter()
        self.times += [now] * len(out.token_ids)   # an abort's last delta carries no token
        if out.finished:
            self.finish_reason = out.finish_reason
            self.done.set()


def gaps_ending_in(times: list[float], start: float, end: float) -> list[float]:
    """Seconds between consecutive tokens, for the gaps whose later token lies in (start, end]."""
    return [b - a for a, b in zip(times, times[1:]) if start < b <= end]


def summarize(decoders: list[Timeline], longs: list[Timeline], prompt: int, t_ready: float, t0: float,
              t_end: float) -> dict:
    """The figures of one run from its timelines (times in perf_counter seconds)."""
    import numpy as np

    mixed = [g for d in decoders for g in gaps_ending_in(d.times, t0, t_end)]
    alone = [g for d in decoders for g in gaps_ending_in(d.times, t_ready, t0)]
    decoder_tokens = sum(t0 < t <= t_end for d in decoders for t in d.times)
    tokens = len(longs) * prompt + sum(len(r.times) for r in longs) + decoder_tokens
    return dict(itl_median_ms=1e3 * float(np.median(mixed)), itl_p99_ms=1e3 * float(np.percentile(mixed, 99)),
                itl_max_ms=1e3 * max(mixed), alone_median_ms=1e3 * float(np.median(alone)),
                ttft_median_ms=1e3 * statistics.median(r.times[0] - r.submitted for r in longs),
                tokens=tokens, wall_s=t_end - t0, tok_s=tokens / (t_end - t0), itl_gaps=len(mixed))


def run_engine(engine, rng, vocab: int, args, gap_ms: float) -> dict:
    """The scenario on one engine: -> summarize()'s figures, plus the timelines ("decoders",
    "longs"), t_ready / t0 / t_end and the prefill chunks each long prompt ran in ("chunks":
    [(start, tokens)] per long prompt, in order). gap_ms: between two long prompts' arrivals."""
    # Observe the chunks the scheduler launches (call through unchanged): how each long prompt was split.
    chunks, launch = {}, engine._prefill_one_chunk

    def observed(req):
        start = req.prefilled
        t = launch(req)
        chunks.setdefault(req.id, []).append((start, req.prefilled - start))
        return t

    engine._prefill_one_chunk = observed
    try:
        return _scenario(engine, rng, vocab, args, gap_ms, chunks)
    finally:
        del engine._prefill_one_chunk   # the class's again; no cycle keeps the engine (its KV cache) alive


def _scenario(engine, rng, vocab: int, args, gap_ms: float, chunks: dict) -> dict:
    """run_engine's requests and waits; `chunks` {request id: [(start, tokens)]} fills as they run."""
    from serve import SamplingParams

    short = [rng.integers(0, vocab, args.decoder_prompt).tolist() for _ in range(args.decoders)]
    long_ = [rng.integers(0, vocab, args.prompt).tolist() for _ in range(args.arrivals)]
    decoders = [Timeline() for _ in short]
    dec_reqs = []
    for ids, tl in zip(short, decoders):
        tl.submitted = time.perf_counter()
        dec_reqs.append(engine.submit(ids, SamplingParams(max_tokens=None, temperature=0, ignore_eos=True),
                                      tl.on_output))

    def wait(until, what):
        while not until():
            if engine.error is not None:
                raise RuntimeError(f"the engine failed while {what}: {engine.error!r}")
            if any(d.done.is_set() for d in decoders):
                raise RuntimeError(f"a decoder finished while {what}: raise --context (decoders run until cancelled)")
            time.sleep(0.001)

    wait(lambda: all(len(d.times) >= args.solo_tokens for d in decoders), "the decoders started")
    t_ready = max(d.times[0] for d in decoders)
    t0 = time.perf_counter()
    longs = [Timeline() for _ in long_]
    long_reqs = []
    for i, (ids, tl) in enumerate(zip(long_, longs)):
        delay = t0 + i * gap_ms / 1e3 - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        tl.submitted = time.perf_counter()
        long_reqs.append(engine.submit(ids, SamplingParams(max_tokens=args.long_tokens, temperature=0,
                                                           ignore_eos=True), tl.on_output))
    wait(lambda: all(r.done.is_set() for r in longs), "the long prompts ran")
    if any(r.finish_reason != "length" for r in longs):
        raise RuntimeError(f"a long prompt ended early: {[r.finish_reason for r in longs]}")
    t_end = max(r.times[-1] for r in longs)
    for r in dec_reqs:
        engine.cancel(r)
    for d in decoders:
        d.done.wait(60)
    res = summarize(decoders, longs, args.prompt, t_ready, t0, t_end)
    res.update(decoders=decoders, longs=longs, t_ready=t_ready, t0=t0, t_end=t_end,
               chunks=[chunks.get(r.id, []) for r in long_reqs])
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="Qwen3-30B-A3B-FP8", help="a serve.bench preset (random weights)")
    p.add_argument("--context", type=int, default=10240, help="the engine's context length")
    p.add_argument("--chunk-sizes", default="512,1024,2048",
                   help="chunked_prefill_size values, comma-separated, each on a fresh engine; the first is the "
                        "baseline (repeat it last for the run-to-run noise)")
    p.add_argument("--decoders", type=int, default=16, help="requests decoding throughout (D)")
    p.add_argument("--decoder-prompt", type=int, default=128, help="each decoder's prompt tokens")
    p.add_argument("--solo-tokens", type=int, default=32,
                   help="tokens each decoder has before the long prompts arrive (decode alone)")
    p.add_argument("--prompt", type=int, default=8192, help="each long prompt's tokens")
    p.add_argument("--arrivals", type=int, default=4, help="long prompts (P)")
    p.add_argument("--long-tokens", type=int, default=16, help="tokens each long prompt generates")
    p.add_argument("--gap-ms", default="1000,0",
                   help="ms between two long prompts' arrivals (0: at once); several, comma-separated, each "
                        "run on every engine (one table each)")
    p.add_argument("--decode-batch-sizes", default=None,
                   help="the engines' decode batch sizes, comma-separated (default: D, so the steps run at D "
                        "or D + P rows as the engine's own sizes would run them, without compiling the "
                        "smaller ones)")
    p.add_argument("--compilation-cache", metavar="DIR", default=None,
                   help="JAX's persistent compilation cache, as `python -m serve --compilation-cache` "
                        "(default: $XDG_CACHE_HOME/qwen3-jax/xla; 'off' disables)")
    p.add_argument("--mesh", default="tp=1", help="device mesh, e.g. tp=2")
    p.add_argument("--layers", type=int, default=None, help="build only N layers")
    args = p.parse_args(argv)
    sizes = [int(c) for c in args.chunk_sizes.split(",") if c]
    if not sizes or min(sizes) < 1:
        p.error(f"--chunk-sizes {args.chunk_sizes!r}: give positive token counts, e.g. 512,1024,2048")
    gaps = [float(g) for g in args.gap_ms.split(",") if g]
    if not gaps or min(gaps) < 0:
        p.error(f"--gap-ms {args.gap_ms!r}: give milliseconds of 0 or more, e.g. 1000,0")
    if args.prompt + args.long_tokens > args.context:
        p.error(f"--prompt + --long-tokens ({args.prompt + args.long_tokens}) must fit --context {args.context}")
    if args.decoders < 1 or args.arrivals < 1 or args.solo_tokens < 2 or args.long_tokens < 1:
        p.error("--decoders, --arrivals and --long-tokens must be at least 1, --solo-tokens at least 2")

    from serve.cli import enable_compilation_cache
    enable_compilation_cache(args.compilation_cache)   # before the first compile

    import jax
    import numpy as np

    import qwen3_jax
    from serve.bench import environment, resolve_bench_config
    from serve.engine import Engine

    env = environment(args)
    env["command"] = "python benchmarks/mixed_load.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    print(f"# {env['card']}, jax {env['jax']}, {env['date']}, commit {env['commit']}"
          f"{'' if not env['clocks'] else ', ' + env['clocks']}", flush=True)
    print(f"# {env['command']}", flush=True)
    cfg = resolve_bench_config(args.model, args.layers)
    t0 = time.perf_counter()
    model = qwen3_jax.random_model(cfg, mesh=args.mesh, dtype="bfloat16")
    slots = args.decoders + args.arrivals   # every request running at once: none waits for a slot
    batch_sizes = ([int(b) for b in args.decode_batch_sizes.split(",") if b] if args.decode_batch_sizes
                   else [args.decoders])
    print(f"{args.model}, mesh {args.mesh}, context {args.context}, {slots} slots; {args.decoders} decoders "
          f"({args.decoder_prompt}-token prompts) + {args.arrivals} x {args.prompt}-token prompts "
          f"({args.long_tokens} tokens each); "
          f"model built in {time.perf_counter() - t0:.1f} s", flush=True)

    def arriving(gap):
        return f"every {gap:g} ms" if gap else "at once"

    results = []   # per chunk size (in --chunk-sizes order; one given twice: the noise), per gap
    for chunk in sizes:
        t0 = time.perf_counter()
        # Prefix caching off: random prompts share nothing, and every prompt token is then prefilled.
        engine = Engine(model, context_length=args.context, max_running_requests=slots, chunked_prefill_size=chunk,
                        decode_batch_sizes=batch_sizes, prefix_caching=False, progress=False)
        engine.variants_warm.wait()   # its idle compiles (Engine.WARM_VARIANTS) stay out of the timings
        try:
            if engine.num_slots < slots:
                raise SystemExit(f"the KV cache holds {engine.num_slots} requests of {args.context} tokens, "
                                 f"the scenario needs {slots}: lower --context or --decoders")
            print(f"  chunk {chunk}: engine ready in {time.perf_counter() - t0:.1f} s (decode batch sizes "
                  f"{engine.decode_batch_sizes})", flush=True)
            for gap in gaps:   # the same prompts on every engine and at every gap
                res = run_engine(engine, np.random.default_rng(0), cfg.vocab_size, args, gap)
                res.update(chunk=chunk, gap_ms=gap)
                results.append(res)
                per = sorted({len(c) for c in res["chunks"]})
                print(f"    {arriving(gap)}: {'/'.join(map(str, per))} chunks per long prompt, "
                      f"{res['itl_gaps']} decoder gaps in {res['wall_s']:.2f} s", flush=True)
        finally:
            engine.shutdown()
        del engine
        gc.collect()   # this engine's KV cache freed before the next one sizes and allocates its own

    keys = ("itl_median_ms", "itl_p99_ms", "itl_max_ms", "ttft_median_ms", "tok_s")
    for gap in gaps:
        rows = [r for r in results if r["gap_ms"] == gap]
        base = rows[0]
        print(f"\nlong prompts {arriving(gap)}; alone: the decoders' ITL median before they arrived")
        print(f"{'chunk':>6} {'alone ms':>9} {'ITL med ms':>11} {'ITL p99 ms':>11} {'ITL max ms':>11} "
              f"{'TTFT med ms':>12} {'tokens/s':>10} | against chunk {base['chunk']}, same run: "
              f"{'ITL med':>7} {'ITL p99':>7} {'ITL max':>7} {'TTFT':>6} {'tok/s':>6}")
        for r in rows:
            print(f"{r['chunk']:>6} {r['alone_median_ms']:>9.2f} {r['itl_median_ms']:>11.2f} {r['itl_p99_ms']:>11.2f} "
                  f"{r['itl_max_ms']:>11.2f} {r['ttft_median_ms']:>12.1f} {r['tok_s']:>10.0f} | "
                  f"{'':>27}" + " ".join(f"{r[k] / base[k]:>{w}.2f}x" for k, w in zip(keys, (6, 6, 6, 5, 5))))
    return results


if __name__ == "__main__":
    main()
