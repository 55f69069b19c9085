"""The sampler's top-64 over a 152k vocabulary: lax.top_k against serve.sampling.top_k_rows'
pruned form (block maxima first) at several block sizes, and the whole top-64 sampler with each
(runs 105-107 in NOTES.md; the forms measured there and dropped are not here).

Per batch B of float32 logits [B, 151936]: device time of one call (the profiler's span, first
kernel to last, so no host gap counts), for the greedy argmax (the one read every sampler pays),
lax.top_k(64), the pruned form at several block sizes, and serve.sampling.sample in "top64" mode
(Qwen3's temperature 0.6, top_p 0.95, top_k 20) with each form, and in "full" mode (top_k off:
the whole row sorted), what a request that turns top_k off pays. Each time is shown against the
read of the logits at the copy bandwidth measured in the same run, and against lax.top_k in the
same run. Also checks the pruned form's values and ids against lax.top_k's (exactness, ties
included: the logits are rounded to bf16, so ties are common).

    python benchmarks/top_k.py                       # GPU: the figures
    python benchmarks/top_k.py --batch 2 --vocab 8192 --blocks 16,64   # CPU: works
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax                                   # noqa: E402
import jax.numpy as jnp                      # noqa: E402
import numpy as np                           # noqa: E402

from qwen3_jax.kernels.tune import device_timeline   # noqa: E402
from serve import sampling                   # noqa: E402
from serve.bench import ints, measure_ceilings   # noqa: E402


def device_us(fn, *args) -> float:
    """Device span of one call of jitted fn, in us (wall time where no profile was written)."""
    tl = device_timeline(lambda: fn(*args))
    if tl is None or tl["first_ns"] is None:
        import time
        jax.block_until_ready(fn(*args))
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        return 1e6 * (time.perf_counter() - t0)
    return (tl["last_ns"] - tl["first_ns"]) / 1e3


def sampler(b: int, form: str, mode: str = "top64"):
    """sampling.sample in `mode` with TOP_K = form, jitted; Qwen3's temperature 0.6 and top_p
    0.95, top_k 20 ("full": top_k off, the whole row sorted)."""
    params = (jnp.full(b, 0.6, jnp.float32), jnp.full(b, 0.95, jnp.float32),
              jnp.full(b, 20 if mode == "top64" else -1, jnp.int32), jnp.arange(b, dtype=jnp.int32),
              jnp.zeros(b, jnp.int32))

    def run(x):
        saved, sampling.TOP_K = sampling.TOP_K, form   # read while tracing
        try:
            return sampling.sample(x, *params, mode=mode)
        finally:
            sampling.TOP_K = saved
    return jax.jit(run)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=ints, default=[1, 16, 64, 256], help="rows, comma-separated")
    ap.add_argument("--vocab", type=int, default=151936, help="columns (Qwen3: 151936)")
    ap.add_argument("--blocks", type=ints, default=[64, 128, 256], help="pruned-form block sizes to time")
    ap.add_argument("--width", type=int, default=sampling.TOP_K_FAST, help="k of the top-k")
    args = ap.parse_args(argv)
    on_gpu = jax.default_backend() == "gpu"
    ceil = measure_ceilings(on_gpu, reps=10)
    bw = ceil["bandwidth"] / 2   # copy bandwidth counts read + write; a read of x counts once
    print(f"devices: {jax.devices()}")
    print(f"copy bandwidth {ceil['bandwidth'] / 1e12:.3f} TB/s (read+write); vocab {args.vocab}, k {args.width}")
    top = jax.jit(lambda x: jax.lax.top_k(x, args.width))
    argmax = jax.jit(lambda x: jnp.argmax(x, axis=-1))
    print(f"{'batch':>5} {'form':<26} {'us':>9} {'us/row':>8} {'x read':>7} {'vs top_k':>8}  exact")
    for b in args.batch:
        x = jax.random.normal(jax.random.key(b), (b, args.vocab), jnp.float32)
        x = x.astype(jnp.bfloat16).astype(jnp.float32)   # ties, as bf16 logits have
        read_us = 1e6 * x.nbytes / bw
        ref_vals, ref_ids = top(x)
        base = device_us(top, x)

        def row(name, us, exact=""):
            print(f"{b:>5} {name:<26} {us:>9.1f} {us / b:>8.2f} {read_us / us:>7.1%} {base / us:>7.2f}x  {exact}",
                  flush=True)

        row("argmax (greedy)", device_us(argmax, x))
        row("lax.top_k", base, "ref")
        for block in args.blocks:
            fn = jax.jit(lambda a, block=block: sampling.top_k_rows(a, args.width, "pruned", block))
            vals, ids = fn(x)
            same = bool(np.array_equal(np.asarray(ids), np.asarray(ref_ids))
                        and np.array_equal(np.asarray(vals), np.asarray(ref_vals)))
            row(f"pruned {block}", device_us(fn, x), "yes" if same else "NO")
        first = None
        for form in ("lax", "pruned"):
            fn = sampler(b, form)
            ids = np.asarray(fn(x))
            first = ids if first is None else first
            row(f"sample top64, {form}", device_us(fn, x), "same ids" if np.array_equal(ids, first) else "DIFFERENT")
        row("sample full (sort)", device_us(sampler(b, "lax", "full"), x))


if __name__ == "__main__":
    main()
