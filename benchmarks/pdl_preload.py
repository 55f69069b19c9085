"""Can a kernel read its weights while the kernel before it still runs? (GPU only; run 46 in NOTES.md)

A batch-1 decode layer is a chain of ~12 kernels, and each link costs ~2-2.5 us beyond its bytes
(runs 23-40). XLA launches kernels with programmatic dependent launch (PDL): a kernel may start
before the one it depends on has finished, and waits for it at `griddepcontrol.wait`. Triton
kernels get that wait at their entry. A Pallas Mosaic GPU kernel places its own wait, so it can
issue its weight loads (which do not depend on the previous kernel) first.

This measures a chain of L layers, each a producer P followed by a consumer C:
  P: a Pallas Triton kernel of 64 programs, each reading 32 KiB (like decode attention reading
     the KV cache at batch 1), optionally signalling `griddepcontrol.launch_dependents` at entry;
  C: a Pallas Mosaic GPU kernel of 128 CTAs, each loading a 16 x 2048 bf16 weight slice (64 KiB,
     8 MiB in all, an FP8 o_proj's bytes) into shared memory with TMA, and reading P's output
     after `griddepcontrol.wait`: the wait before the weight loads ("wait-first") or after them
     ("preload").
If the preload overlaps P, a layer costs about max(P, the load) instead of P + the load.

    python benchmarks/pdl_preload.py
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import functools                              # noqa: E402

import jax                                    # noqa: E402
import jax.numpy as jnp                       # noqa: E402
from jax.experimental import pallas as pl     # noqa: E402
from jax.experimental.pallas import mosaic_gpu as plgpu   # noqa: E402
from jax.experimental.pallas import triton as plt         # noqa: E402


L = 32            # layers in the chain (distinct weights: 256 MiB, far past L2)
P_PROGRAMS = 64   # producer programs
P_ROWS = 128      # producer rows per program (x 128 bf16 = 32 KiB)
C_CTAS = 128      # consumer CTAs
BN, K, CK = int(os.environ.get("PDL_BN", 16)), 2048, 256   # consumer weight rows per CTA, K, K per TMA copy


def producer(o_prev, kv_all, layer: int, *, trigger: bool):
    """o_prev [C_CTAS * 128] f32 (the consumer's output), kv_all [L, P_PROGRAMS, P_ROWS, 128] bf16
    (layer `layer` read in place: a slice handed to a custom call would be copied first) ->
    x [P_PROGRAMS * 128] bf16: program i writes sum over its kv rows + o_prev[i-th 128]."""
    def body(o_ref, kv_ref, x_ref):
        acc = jnp.sum(kv_ref[...].astype(jnp.float32), axis=0) + o_ref[...]
        if trigger:
            idx = jax.lax.broadcasted_iota(jnp.int32, (128,), 0)
            (t,) = plt.elementwise_inline_asm(
                "griddepcontrol.launch_dependents;\nmov.b32 $0, $1;", args=[idx], constraints="=r,r", pack=1,
                result_shape_dtypes=[jax.ShapeDtypeStruct((128,), jnp.int32)])
            acc = acc + (t - idx).astype(jnp.float32)   # opaque to the compiler: keeps the asm
        x_ref[...] = acc.astype(x_ref.dtype)
    return pl.pallas_call(
        body, grid=(P_PROGRAMS,),
        in_specs=[pl.BlockSpec((128,), lambda i: (i,)), pl.BlockSpec((None, None, P_ROWS, 128), lambda i: (layer, i, 0, 0))],
        out_specs=pl.BlockSpec((128,), lambda i: (i,)),
        out_shape=jax.ShapeDtypeStruct((P_PROGRAMS * 128,), jnp.bfloat16),
        compiler_params=plt.CompilerParams(num_warps=4, num_stages=2),
    )(o_prev, kv_all)


def consumer(x, w_all, layer: int, *, preload: bool, trigger: bool = False):
    """x [P_PROGRAMS * 128] bf16, w_all [L, C_CTAS * BN, K] bf16 -> [C_CTAS * 128] f32: CTA c
    writes x[:128] + w[c * BN, :128] after loading its whole [BN, K] slice into shared memory."""
    chunks = K // CK

    def body(x_hbm, w_hbm, o_hbm, w_smem, x_smem, o_smem, bar_w, bar_x):
        c = jax.lax.axis_index("c")
        if trigger:
            plgpu.griddepcontrol_launch_dependents()

        def load_w():
            for j in range(chunks):
                plgpu.copy_gmem_to_smem(w_hbm.at[layer, pl.ds(c * BN, BN), pl.ds(j * CK, CK)], w_smem.at[j], bar_w)

        if preload:
            load_w()
        plgpu.griddepcontrol_wait()
        if not preload:
            load_w()
        plgpu.copy_gmem_to_smem(x_hbm.at[pl.ds(0, 128)], x_smem, bar_x)
        plgpu.barrier_wait(bar_x)
        plgpu.barrier_wait(bar_w)
        o_smem[...] = x_smem[...].astype(jnp.float32) + w_smem[chunks - 1, BN - 1, pl.ds(0, 128)].astype(jnp.float32)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_hbm.at[pl.ds(c * 128, 128)])
        plgpu.wait_smem_to_gmem(0)

    return plgpu.kernel(
        body, out_type=jax.ShapeDtypeStruct((C_CTAS * 128,), jnp.float32),
        scratch_types=[plgpu.SMEM((chunks, BN, CK), jnp.bfloat16), plgpu.SMEM((128,), jnp.bfloat16),
                       plgpu.SMEM((128,), jnp.float32), plgpu.Barrier(num_arrivals=chunks),
                       plgpu.Barrier(num_arrivals=1)],
        grid=(C_CTAS,), grid_names=("c",),
    )(x, w_all)


def chain(kv_all, w_all, o0, *, mode: str, p_trigger: bool, c_trigger: bool = False):
    """mode: 'both-wait' / 'both-pre' (P then C per layer), 'p' (P only), 'c-wait' / 'c-pre' (C only);
    p_trigger / c_trigger: P / C signal launch_dependents at entry."""
    o = o0
    for layer in range(L):
        if mode in ("both-wait", "both-pre", "p"):
            x = producer(o, kv_all, layer, trigger=p_trigger)
        else:
            x = o[:P_PROGRAMS * 128].astype(jnp.bfloat16)
        if mode == "p":
            o = jnp.pad(x.astype(jnp.float32), (0, C_CTAS * 128 - x.size))
        else:
            o = consumer(x, w_all, layer, preload=mode.endswith("pre"), trigger=c_trigger)
    return o


def main():
    from qwen3_jax.kernels.tune import device_timeline, median_time
    from serve.bench import measure_ceilings
    ceil = measure_ceilings(True, reps=20)
    bw = ceil["bandwidth"]
    print(f"copy {bw / 1e12:.3f} TB/s (best call)", flush=True)
    k1, k2 = jax.random.split(jax.random.key(0))
    kv_all = jax.random.normal(k1, (L, P_PROGRAMS, P_ROWS, 128), jnp.bfloat16)
    w_all = jax.random.normal(k2, (L, C_CTAS * BN, K), jnp.bfloat16)
    o0 = jnp.zeros((C_CTAS * 128,), jnp.float32)
    # correctness of one layer against jnp
    x = producer(o0, kv_all, 0, trigger=True)
    ref_x = (jnp.sum(kv_all[0].astype(jnp.float32), axis=1) + o0[:P_PROGRAMS * 128].reshape(P_PROGRAMS, 128))
    print("producer err", float(jnp.max(jnp.abs(x.astype(jnp.float32) - ref_x.reshape(-1)))), flush=True)
    for pre in (False, True):
        o = consumer(x, w_all, 3, preload=pre)
        ref_o = x[:128].astype(jnp.float32)[None] + w_all[3, BN - 1::BN, K - CK:K - CK + 128].astype(jnp.float32)
        print(f"consumer preload={pre} err", float(jnp.max(jnp.abs(o.reshape(C_CTAS, 128) - ref_o))), flush=True)
    c_bytes = BN * K * 2 * C_CTAS
    p_bytes = P_PROGRAMS * P_ROWS * 128 * 2
    print(f"per layer: P reads {p_bytes / 2**20:.1f} MiB ({p_bytes / bw * 1e6:.2f} us at copy), C reads "
          f"{c_bytes / 2**20:.1f} MiB ({c_bytes / bw * 1e6:.2f} us)", flush=True)
    rows = [("p", False, False), ("c-wait", False, False), ("c-pre", False, False), ("c-wait", False, True),
            ("c-pre", False, True), ("both-wait", False, False), ("both-pre", False, False),
            ("both-wait", True, True), ("both-pre", True, True)]
    for mode, trig, ctrig in rows:
        fn = jax.jit(functools.partial(chain, mode=mode, p_trigger=trig, c_trigger=ctrig))
        t = median_time(fn, (kv_all, w_all, o0), reps=20, warmup=2)
        tl = device_timeline(lambda: fn(kv_all, w_all, o0))
        span = (tl["last_ns"] - tl["first_ns"]) / 1e3 / L
        kern = "  ".join(f"{n[:24]} {ns / c / 1e3:.2f}" for n, (c, ns) in sorted(tl["by_name"].items()) if c >= L)
        print(f"  {mode:10s} P trigger={str(trig):5s} C trigger={str(ctrig):5s}  wall {t / L * 1e6:6.2f}  device span {span:6.2f} us per layer"
              f"  | per kernel us: {kern}", flush=True)


if __name__ == "__main__":
    main()
