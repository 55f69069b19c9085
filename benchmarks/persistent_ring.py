"""Persistent chain, Mosaic GPU form: a TMA ring of weight slots keeps each program's weight
stream going through every dependency wait? (GPU only; run 64 in NOTES.md)

Run 61 (benchmarks/persistent_chain.py, Pallas Triton) found a dependency inside one kernel costs
what a kernel boundary costs, and loading a link's weights into registers before the wait saves
only 7-9%: one program per SM keeps one 64 KiB load in flight, and Triton gives no control over
more. Here each CTA owns a ring of DEPTH shared-memory slots, filled by TMA copies issued links
ahead, so the weight stream need not stop while the chain waits.

The chain: L links over G CTAs. CTA c of link p TMA-loads its [BN, D] slice of W[p] (64 KiB of
bf16: 8 MiB a link, an FP8 o_proj's bytes) into a slot, waits until all G CTAs have finished link
p - 1 (a GPU-scope semaphore: G signals), reads V values of link p's input written by CTA c + 1,
and writes x[p + 1][c] = x[p][c + 1] + (V weights of its slice). The arithmetic is a stand-in
for a gemv's (its SMEM reads would add ~0.2-0.5 us); the bytes streamed and the cross-CTA data
dependency are a decode layer's. Variants:
  separate:    one kernel per link, chained by XLA;
  wait-first:  one kernel; a link's weight copies are issued after its wait;
  ring-N:      one kernel; weights issued N links ahead (a ring of N slots);
  nowait-3:    ring-3 without the semaphore (a race: timing only): the streaming floor.
The semaphores are global (pl.get_global) and left at zero at exit: every CTA signals a "done"
count at the end; CTA 0 takes it and subtracts G from each link's count.

    python benchmarks/persistent_ring.py
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import functools                              # noqa: E402

import jax                                    # noqa: E402
import jax.numpy as jnp                       # noqa: E402
from jax.experimental import pallas as pl     # noqa: E402
from jax.experimental.pallas import mosaic_gpu as plgpu   # noqa: E402

L, G, BN, D = 32, 128, 16, 2048   # links, CTAs, weight rows per CTA, K
CK = 256                          # K per TMA copy (a box dimension is at most 256)
CH = D // CK
V = 128                           # values of x each CTA writes per link
VARIANTS = ("separate", "wait-first", "ring-1", "ring-2", "ring-3", "nowait-3")


def _link_value(x_ref_row, w_slot):
    """The stand-in arithmetic: V float32 values from x's V values and the slot's last row."""
    return x_ref_row[...] + w_slot[CH - 1, BN - 1, pl.ds(0, V)].astype(jnp.float32)


def separate(x0, w_all):
    """x0 [G * V] f32, w_all [L, G * BN, D] bf16 -> xs [L + 1, G * V] f32, a kernel per link."""
    def link(p, x):
        def body(x_hbm, w_hbm, o_hbm, w_smem, x_smem, o_smem, bar_w, bar_x):
            c = jax.lax.axis_index("c")
            for j in range(CH):
                plgpu.copy_gmem_to_smem(w_hbm.at[p, pl.ds(c * BN, BN), pl.ds(j * CK, CK)], w_smem.at[j], bar_w)
            src = jax.lax.rem(c + 1, G)
            plgpu.copy_gmem_to_smem(x_hbm.at[pl.ds(src * V, V)], x_smem, bar_x)
            plgpu.barrier_wait(bar_x)
            plgpu.barrier_wait(bar_w)
            o_smem[...] = _link_value(x_smem, w_smem)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem, o_hbm.at[pl.ds(c * V, V)])
            plgpu.wait_smem_to_gmem(0)

        return plgpu.kernel(
            body, out_type=jax.ShapeDtypeStruct((G * V,), jnp.float32),
            scratch_types=[plgpu.SMEM((CH, BN, CK), jnp.bfloat16), plgpu.SMEM((V,), jnp.float32),
                           plgpu.SMEM((V,), jnp.float32), plgpu.Barrier(num_arrivals=CH), plgpu.Barrier(num_arrivals=1)],
            grid=(G,), grid_names=("c",),
        )(x, w_all)
    xs = [x0]
    for p in range(L):
        xs.append(link(p, xs[-1]))
    return jnp.stack(xs)


def persistent(x0, w_all, *, variant: str):
    """One kernel for the chain -> xs [L + 1, G * V] f32 (rows 1..L; row 0 unwritten)."""
    depth = 1 if variant == "wait-first" else int(variant.rsplit("-", 1)[1])
    wait = not variant.startswith("nowait")
    early = variant != "wait-first"

    def body(x_hbm, w_hbm, o_hbm, w_smem, x_smem, o_smem, bar_w, bar_x):
        c = jax.lax.axis_index("c")
        src = jax.lax.rem(c + 1, G)
        sems = pl.get_global(plgpu.SemaphoreType.REGULAR((L + 2,)))   # [p]: CTAs done with link p-1; [L+1]: exits

        def load_w(p):
            s = p % depth
            for j in range(CH):
                plgpu.copy_gmem_to_smem(w_hbm.at[p, pl.ds(c * BN, BN), pl.ds(j * CK, CK)], w_smem.at[s, j], bar_w.at[s])

        if early:
            for p in range(min(depth, L)):
                load_w(p)
        for p in range(L):
            s = p % depth
            if p == 0:
                plgpu.copy_gmem_to_smem(x_hbm.at[pl.ds(src * V, V)], x_smem, bar_x)
            else:
                if wait:
                    plgpu.semaphore_wait(sems.at[p], G, decrement=False, memory_scope="gpu")
                plgpu.copy_gmem_to_smem(o_hbm.at[p, pl.ds(src * V, V)], x_smem, bar_x)
            if not early:
                load_w(p)
            plgpu.barrier_wait(bar_x)
            plgpu.barrier_wait(bar_w.at[s])
            o_smem[...] = _link_value(x_smem, w_smem.at[s])
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem, o_hbm.at[p + 1, pl.ds(c * V, V)])
            plgpu.wait_smem_to_gmem(0)
            if wait:
                plgpu.semaphore_signal(sems.at[p + 1], 1, memory_scope="gpu")
            if early and p + depth < L:
                load_w(p + depth)      # slot s was read by the line above the store
        if wait:
            plgpu.semaphore_signal(sems.at[L + 1], 1, memory_scope="gpu")

            @pl.when(c == 0)
            def _():
                plgpu.semaphore_wait(sems.at[L + 1], G, decrement=True, memory_scope="gpu")
                for p in range(1, L + 1):
                    plgpu.semaphore_signal(sems.at[p], -G, memory_scope="gpu")

    xs = plgpu.kernel(
        body, out_type=jax.ShapeDtypeStruct((L + 1, G * V), jnp.float32),
        scratch_types=[plgpu.SMEM((depth, CH, BN, CK), jnp.bfloat16), plgpu.SMEM((V,), jnp.float32),
                       plgpu.SMEM((V,), jnp.float32), plgpu.Barrier(num_arrivals=CH, num_barriers=depth),
                       plgpu.Barrier(num_arrivals=1)],
        grid=(G,), grid_names=("c",),
    )(x0, w_all)
    return xs   # row 0 is never written (XLA 0.11.2 refused an update-slice of this output)


def chain(x0, w_all, variant: str):
    return separate(x0, w_all) if variant == "separate" else persistent(x0, w_all, variant=variant)


def reference(x0, w_all):
    """The chain in jnp: x[p + 1][c] = x[p][c + 1] + w[p, c * BN + BN - 1, (CH - 1) * CK : ... + V]."""
    wv = w_all[:, BN - 1::BN, (CH - 1) * CK:(CH - 1) * CK + V].astype(jnp.float32)   # [L, G, V]
    xs = [x0]
    for p in range(L):
        xs.append((jnp.roll(xs[-1].reshape(G, V), -1, axis=0) + wv[p]).reshape(-1))
    return jnp.stack(xs)


def main():
    from qwen3_jax.kernels.tune import device_timeline, median_time
    from serve.bench import measure_ceilings
    sms = getattr(jax.devices()[0], "core_count", None)
    if sms is not None and G > sms:
        raise SystemExit(f"G={G} > {sms} SMs: the persistent waits could deadlock")
    bw = measure_ceilings(True, reps=20)["bandwidth"]
    link_bytes = G * BN * D * 2
    print(f"device {jax.devices()[0].device_kind}, {sms} SMs; copy {bw / 1e12:.3f} TB/s (best call); "
          f"{link_bytes / 2**20:.0f} MiB per link ({link_bytes / bw * 1e6:.2f} us at the copy rate)", flush=True)
    k1, k2 = jax.random.split(jax.random.key(0))
    w_all = jax.random.normal(k1, (L, G * BN, D), jnp.bfloat16)
    x0 = jax.random.normal(k2, (G * V,), jnp.float32)
    want = reference(x0, w_all)
    for variant in VARIANTS:
        try:
            fn = jax.jit(functools.partial(chain, variant=variant))
            err = float(jnp.max(jnp.abs(fn(x0, w_all)[1:] - want[1:])))
            t = median_time(fn, (x0, w_all), reps=20, warmup=2)
            err2 = float(jnp.max(jnp.abs(fn(x0, w_all)[1:] - want[1:])))   # the semaphores were reset between calls
            tl = device_timeline(lambda: fn(x0, w_all))
        except Exception as e:   # one variant's failure must not hide the others' figures
            print(f"  {variant:10s} FAILED: {type(e).__name__}: {str(e)[:600]}", flush=True)
            continue
        span = (tl["last_ns"] - tl["first_ns"]) / 1e3 / L if tl else float("nan")
        print(f"  {variant:10s} wall {t / L * 1e6:6.2f}  device span {span:6.2f} us per link "
              f"({link_bytes / bw * 1e6 / span:5.1%} of copy rate)  max|x - reference| {err:.3g} (after reps {err2:.3g})",
              flush=True)


if __name__ == "__main__":
    main()
