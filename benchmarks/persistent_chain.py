"""Does one persistent kernel hide the ~2-2.5 us a batch-1 dependency costs? (GPU only; run 60 in NOTES.md)

A batch-1 decode layer is a chain of ~12 kernels, and each link costs ~2-2.5 us beyond its bytes
(runs 23-46). XLA's PDL gave no early start to hide a weight stream behind (run 46). The other
way to overlap is one kernel that runs every link: its programs stay resident, wait for the
previous link's output at a counter in global memory, and may issue the next link's weight loads
before that wait, since weights never depend on activations.

The chain: L links, link p computes x[p+1] = W[p] @ x[p] (W[p] [D, D], x [D]), G programs each
owning BN = D / G output rows, so a link reads D * D weight bytes (8 MiB in bf16: an FP8 o_proj's
bytes; 4 MiB in e4m3). Variants:
  separate:  one pallas_call per link, chained by XLA (what the model does now);
  wait:      one kernel; each program spins until link p's counter reaches G, then loads x[p] and
             its W[p] rows, computes, stores its rows of x[p+1], and bumps link p+1's counter
             (CTA barrier, then an acquire-release atomic at GPU scope);
  prefetch:  as wait, but W[p]'s rows are loaded before the spin (in flight during it);
  prefetch2: as prefetch, but W[p+1]'s rows are loaded before link p's spin (a link ahead);
  nowait:    one kernel, no counters (a race: timing only), the same loads: the streaming floor;
  *-s3:      the same with Triton's software pipelining over the link loop (num_stages=3).
G <= the SM count, so every program is resident and the spin cannot deadlock; a spin also gives
up after SPIN_LIMIT polls and reports it, so a mistake cannot hang the device.

If "prefetch" costs close to "nowait" per link (and well under "separate"), a persistent
decode layer would hide the per-link cost; if it costs like "wait", the dependency itself is the
cost and that route is closed too.

    python benchmarks/persistent_chain.py
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import functools                              # noqa: E402

import jax                                    # noqa: E402
import jax.numpy as jnp                       # noqa: E402
from jax.experimental import pallas as pl     # noqa: E402
from jax.experimental.pallas import triton as plt   # noqa: E402

L = 32                 # links (distinct weights: 256 MiB in bf16, far past L2)
ROWS = 64              # rows of xs and counters: L + 1 padded to a power of two (Triton blocks)
D = 2048
G = int(os.environ.get("CHAIN_PROGRAMS", 128))
BN = D // G
SPIN_LIMIT = 1 << 22   # polls before a spin gives up (~seconds): a missed signal cannot hang
NUM_WARPS = int(os.environ.get("CHAIN_WARPS", 8))
VARIANTS = ("separate", "wait", "prefetch", "prefetch2", "nowait", "prefetch-s3", "nowait-s3")


def _link_rows(w, x):
    """w [BN, D], x [D] -> [BN] float32 (the rows' dot products)."""
    return jnp.sum(w.astype(jnp.float32) * x.astype(jnp.float32)[None, :], axis=1)


def separate(xs0, w_all):
    """xs0 [ROWS, D] bf16 (row 0 = x[0], rows 1..L written), w_all [L, D, D] -> xs [ROWS, D], one kernel per link."""
    def link(p, x):
        def body(x_ref, w_ref, o_ref):
            o_ref[...] = _link_rows(w_ref[...], x_ref[...]).astype(o_ref.dtype)
        return pl.pallas_call(
            body, grid=(G,),
            in_specs=[pl.BlockSpec((D,), lambda i: (0,)), pl.BlockSpec((None, BN, D), lambda i: (p, i, 0))],
            out_specs=pl.BlockSpec((BN,), lambda i: (i,)),
            out_shape=jax.ShapeDtypeStruct((D,), jnp.bfloat16),
            compiler_params=plt.CompilerParams(num_warps=NUM_WARPS, num_stages=1),
            name="chain_separate",
        )(x, w_all)
    xs = [xs0[0]]
    for p in range(L):
        xs.append(link(p, xs[-1]))
    return xs0.at[:L + 1].set(jnp.stack(xs)), jnp.zeros((), jnp.int32)


def persistent(xs0, w_all, *, variant: str):
    """One kernel for the whole chain -> (xs [ROWS, D], spins that hit SPIN_LIMIT)."""
    base, stages = variant.removesuffix("-s3"), 3 if variant.endswith("-s3") else 1
    counts0 = jnp.zeros((ROWS,), jnp.int32).at[0].set(G)   # link p's input is ready when counts[p] == G
    give_ups0 = jnp.zeros((G,), jnp.int32)

    def body(xs_in, w_ref, counts_in, gu_in, xs_ref, counts_ref, gu_ref):
        del xs_in, counts_in, gu_in   # aliased to the outputs
        i = pl.program_id(0)
        rows = pl.ds(pl.multiple_of(i * BN, BN), BN)

        def spin(p):
            def cond(c):
                return (c[0] < G) & (c[1] < SPIN_LIMIT)

            def poll(c):
                return plt.atomic_add(counts_ref, (p,), jnp.int32(0)), c[1] + 1
            got, polls = jax.lax.while_loop(cond, poll, (plt.atomic_add(counts_ref, (p,), jnp.int32(0)), 0))
            return (polls >= SPIN_LIMIT).astype(jnp.int32)

        def link(p, carry):
            gave_up, w_next = carry[0], carry[1:]
            if base == "prefetch2":
                w = w_next[0]
                w_next = (w_ref[jnp.minimum(p + 1, L - 1), rows, :],)    # next link's rows, in flight
            elif base == "prefetch":
                w = w_ref[p, rows, :]                                    # issued before the spin
            if base != "nowait":
                gave_up = gave_up + spin(p)
            if base in ("wait", "nowait"):
                w = w_ref[p, rows, :]
            x = xs_ref[p, :]
            xs_ref[p + 1, rows] = _link_rows(w, x).astype(xs_ref.dtype)
            if base != "nowait":
                plt.debug_barrier()                                      # every thread's stores first
                plt.atomic_add(counts_ref, (p + 1,), jnp.int32(1))
            return (gave_up, *w_next)

        init = (jnp.int32(0),) + ((w_ref[0, rows, :],) if base == "prefetch2" else ())
        gave_up = jax.lax.fori_loop(0, L, link, init)[0]
        gu_ref[i] = gave_up

    xs, _, gave_up = pl.pallas_call(
        body, grid=(G,),
        out_shape=(jax.ShapeDtypeStruct(xs0.shape, xs0.dtype), jax.ShapeDtypeStruct(counts0.shape, jnp.int32),
                   jax.ShapeDtypeStruct((G,), jnp.int32)),
        input_output_aliases={0: 0, 2: 1, 3: 2},
        compiler_params=plt.CompilerParams(num_warps=NUM_WARPS, num_stages=stages),
        name=f"chain_{variant.replace('-', '_')}",
    )(xs0, w_all, counts0, give_ups0)
    return xs, jnp.sum(gave_up)


def chain(xs0, w_all, variant: str):
    return separate(xs0, w_all) if variant == "separate" else persistent(xs0, w_all, variant=variant)


def main():
    from qwen3_jax.kernels.tune import device_timeline, median_time
    from serve.bench import measure_ceilings
    sms = getattr(jax.devices()[0], "core_count", None)
    if sms is not None and G > sms:
        raise SystemExit(f"CHAIN_PROGRAMS={G} > {sms} SMs: the persistent spin could deadlock")
    bw = measure_ceilings(True, reps=20)["bandwidth"]
    print(f"device {jax.devices()[0].device_kind}, {sms} SMs; copy {bw / 1e12:.3f} TB/s (best call); "
          f"G={G} programs x {BN} rows, {NUM_WARPS} warps", flush=True)
    for wdt in (jnp.bfloat16, jnp.float8_e4m3fn):
        k1, k2 = jax.random.split(jax.random.key(0))
        w_all = (jax.random.normal(k1, (L, D, D), jnp.float32) * D ** -0.5).astype(wdt)
        xs0 = jnp.zeros((ROWS, D), jnp.bfloat16).at[0].set(jax.random.normal(k2, (D,), jnp.bfloat16))
        link_bytes = D * D * jnp.dtype(wdt).itemsize
        print(f"weights {jnp.dtype(wdt).name}: {link_bytes / 2**20:.0f} MiB per link "
              f"({link_bytes / bw * 1e6:.2f} us at the copy rate)", flush=True)
        ref = None
        for variant in VARIANTS:
            fn = jax.jit(functools.partial(chain, variant=variant))
            xs, gave_up = fn(xs0, w_all)
            if variant == "separate":
                ref = xs.astype(jnp.float32)
            err = float(jnp.max(jnp.abs(xs.astype(jnp.float32) - ref)))
            t = median_time(fn, (xs0, w_all), reps=20, warmup=2)
            tl = device_timeline(lambda: fn(xs0, w_all))
            span = (tl["last_ns"] - tl["first_ns"]) / 1e3 / L if tl else float("nan")
            kern = "  ".join(f"{n[:22]} {ns / c / 1e3:.2f}us x{c}" for n, (c, ns) in sorted(tl["by_name"].items())
                             if n.startswith("chain")) if tl else ""
            print(f"  {variant:9s} wall {t / L * 1e6:6.2f}  device span {span:6.2f} us per link "
                  f"({link_bytes / bw * 1e6 / span:5.1%} of copy rate)  max|x - separate| {err:.3g}  "
                  f"spins given up {int(gave_up)}  | {kern}", flush=True)


if __name__ == "__main__":
    main()
