"""An FP8 batch-1 gemv in Mosaic GPU, its weights streamed by TMA, against the model's Pallas
Triton gemv at the FP8 o_proj shape (GPU only; run 66 in NOTES.md).

Run 64 found a Mosaic GPU kernel streaming 8 MiB by TMA in 3.96 us where a Pallas Triton kernel
took 4.83 (run 61), with stand-in arithmetic. This is the real arithmetic: y = x @ W^T for x [K]
bf16, W [N, K] e4m3 stored [out, in] as the checkpoints are, scales [N / 128, K / 128] float32
(one per 128 x 128 block). CTA (r, s) of the grid (N / 64, S) owns 64 output rows and the s-th
K / S columns: TMA copies [64, 128] weight chunks (8 KiB each) and its x slice into shared
memory, then each of the 128 threads multiplies column t of every chunk (64 rows) by x[t] and
the chunk's scale in float32, so the 64 x 128 products need no reduction until the end; the
column sums go through shared memory once, reloaded in the WGMMA register layout where a
reduction over columns exists. Out: float32 partials [S, N] (the caller sums them, as it sums
the Triton gemv's split-K partials). Numerics: W8A16 with float32 products (the Triton gemv
rounds x to f16 for an f16 MMA). Run 66: correct, but bound by its CUDA-core arithmetic (6.36 us
at 256 CTAs against the Triton gemv's 5.25).

tma_gemv_w8a8 is the tensor-core form (run 67): x quantized to e4m3 per 128-wide group (the
model's W8A8 gemv numerics) as the 8-row B operand of a 64 x 8 x 128 wgmma per chunk.

    python benchmarks/tma_gemv.py            # o_proj: both forms against the Triton gemv
    python benchmarks/tma_gemv.py routed     # the MoE down at batch 1 (8 experts)
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax                                    # noqa: E402
import jax.numpy as jnp                       # noqa: E402
import numpy as np                            # noqa: E402
from jax.experimental import pallas as pl     # noqa: E402
from jax.experimental.pallas import mosaic_gpu as plgpu   # noqa: E402

from qwen3_jax.kernels.gemv import quantize_rows          # noqa: E402

BM, CK, BLOCK = 64, 128, 128   # rows per CTA, K per TMA chunk, checkpoint block
LAYERS = 16


def tma_gemv(x_k, w_all, s_all, layer, *, split: int = 4):
    """x [K] bf16, w_all [L, N, K] e4m3, s_all [L, N / 128, K / 128] f32 -> partials [S, N] f32
    (sum over S = x @ dequantized W[layer]^T). `layer` is a Python int (the weights are read in
    place at that layer)."""
    n, k = w_all.shape[1:]
    ks = k // split
    chunks = ks // CK

    def body(x_hbm, w_hbm, s_hbm, o_hbm, w_smem, x_smem, s_smem, acc_smem, o_smem, bar_w, bar_x):
        r, s = jax.lax.axis_index("r"), jax.lax.axis_index("s")
        for j in range(chunks):
            plgpu.copy_gmem_to_smem(w_hbm.at[layer, pl.ds(r * BM, BM), pl.ds(s * ks + j * CK, CK)],
                                    w_smem.at[j], bar_w)
        for j in range(chunks):   # a TMA box is at most 256 elements along each dimension
            plgpu.copy_gmem_to_smem(x_hbm.at[pl.ds(s * ks + j * CK, CK)], x_smem.at[j], bar_x)
        plgpu.copy_gmem_to_smem(s_hbm.at[layer], s_smem, bar_x)
        plgpu.barrier_wait(bar_x)
        plgpu.barrier_wait(bar_w)
        strided = plgpu.Layout.WG_STRIDED((BM, CK), vec_size=1)   # thread t: column t of every row
        acc = None
        for j in range(chunks):
            kb = (s * ks + j * CK) // BLOCK
            xs = x_smem[j].astype(jnp.float32) * s_smem[(r * BM) // BLOCK, kb]
            w = plgpu.load(w_smem.at[j], (), layout=strided, optimized=False).astype(jnp.float32)
            term = w * jnp.broadcast_to(xs[None, :], (BM, CK))
            acc = term if acc is None else acc + term
        acc_smem[...] = acc
        plgpu.commit_smem()
        rows = jnp.sum(plgpu.load(acc_smem, (), layout=plgpu.Layout.WGMMA, optimized=False), axis=1)   # [BM]
        o_smem[...] = rows
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_hbm.at[s, pl.ds(r * BM, BM)])
        plgpu.wait_smem_to_gmem(0)

    return plgpu.kernel(
        body, out_type=jax.ShapeDtypeStruct((split, n), jnp.float32),
        scratch_types=[plgpu.SMEM((chunks, BM, CK), w_all.dtype), plgpu.SMEM((chunks, CK), x_k.dtype),
                       plgpu.SMEM(s_all.shape[1:], jnp.float32), plgpu.SMEM((BM, CK), jnp.float32),
                       plgpu.SMEM((BM,), jnp.float32), plgpu.Barrier(num_arrivals=chunks),
                       plgpu.Barrier(num_arrivals=chunks + 1)],
        grid=(n // BM, split), grid_names=("r", "s"),
    )(x_k, w_all, s_all)


def _promoted_wgmma_chunks(w_smem, x_smem, chunks: int, scale, o_smem, o_dst):
    """In a kernel: sum over j < chunks of (w_smem[j] [64, 128] @ x_smem[j]^T [128, 8]) * scale(j),
    each chunk one wgmma group into a fresh accumulator promoted in float32 (e4m3 MMAs keep
    fewer accumulator bits), -> o_dst [64, 8] in GMEM through o_smem."""
    total = None
    for j in range(chunks):
        def chunk(acc_ref, j=j):
            plgpu.wgmma(acc_ref, w_smem.at[j], plgpu.transpose_ref(x_smem.at[j], (1, 0)))
            plgpu.wgmma_wait(0)
            return acc_ref[...]
        part = pl.run_scoped(chunk, plgpu.ACC((BM, 8), jnp.float32)) * scale(j)
        total = part if total is None else total + part
    o_smem[...] = total
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_dst)
    plgpu.wait_smem_to_gmem(0)


def tma_gemv_w8a8(xq_8k, sx_kb, w_all, s_all, layer, *, split: int = 4):
    """The tensor-core form: xq_8k [8, K] e4m3 (row 0 = x quantized per 128-wide group, rows 1-7
    zero: wgmma's narrowest N), sx_kb [K / 128] f32 (x's group scales), w_all [L, N, K] e4m3,
    s_all [L, N / 128, K / 128] f32 -> partials [S, N, 8] f32 (column 0 is the gemv's).
    Each 128-deep chunk is one wgmma group (64 x 8 x 128, e4m3 x e4m3, both K-major) into a fresh
    accumulator, promoted into float32 with its weight block's and x group's scales (DeepGEMM's
    promotion interval; the model's W8A8 numerics)."""
    n, k = w_all.shape[1:]
    ks = k // split
    chunks = ks // CK
    swizzled = (plgpu.TilingTransform((8, CK)), plgpu.SwizzleTransform(128))   # 128-byte rows of e4m3

    def body(x_hbm, sx_hbm, w_hbm, s_hbm, o_hbm, w_smem, x_smem, sx_smem, s_smem, o_smem, bar_w, bar_x):
        r, s = jax.lax.axis_index("r"), jax.lax.axis_index("s")
        for j in range(chunks):
            plgpu.copy_gmem_to_smem(w_hbm.at[layer, pl.ds(r * BM, BM), pl.ds(s * ks + j * CK, CK)],
                                    w_smem.at[j], bar_w)
            plgpu.copy_gmem_to_smem(x_hbm.at[:, pl.ds(s * ks + j * CK, CK)], x_smem.at[j], bar_x)
        plgpu.copy_gmem_to_smem(sx_hbm, sx_smem, bar_x)
        plgpu.copy_gmem_to_smem(s_hbm.at[layer], s_smem, bar_x)
        plgpu.barrier_wait(bar_x)
        plgpu.barrier_wait(bar_w)
        def scale(j):
            kb = (s * ks + j * CK) // BLOCK
            return s_smem[(r * BM) // BLOCK, kb] * sx_smem[kb]
        _promoted_wgmma_chunks(w_smem, x_smem, chunks, scale, o_smem, o_hbm.at[s, pl.ds(r * BM, BM)])

    return plgpu.kernel(
        body, out_type=jax.ShapeDtypeStruct((split, n, 8), jnp.float32),
        scratch_types=[plgpu.SMEM((chunks, BM, CK), w_all.dtype, transforms=swizzled),
                       plgpu.SMEM((chunks, 8, CK), xq_8k.dtype, transforms=swizzled),
                       plgpu.SMEM(sx_kb.shape, jnp.float32), plgpu.SMEM(s_all.shape[1:], jnp.float32),
                       plgpu.SMEM((BM, 8), jnp.float32), plgpu.Barrier(num_arrivals=chunks),
                       plgpu.Barrier(num_arrivals=chunks + 2)],
        grid=(n // BM, split), grid_names=("r", "s"),
    )(xq_8k, sx_kb, w_all, s_all)


def tma_gemv_routed_w8a8(hq_a8k, sh_akb, groups_a, w_all, s_all):
    """The MoE down form at batch 1: assignment a multiplies its own expert. hq_a8k [A, 8, K] e4m3
    (row 0 of each: assignment a's h quantized per 128; rows 1-7 zero), sh_akb [A, K / 128] f32,
    groups_a [A] int32 (the expert's index into w_all), w_all [G, N, K] e4m3, s_all
    [G, N / 128, KB] f32 with KB >= K / 128 padded so a row is a multiple of 16 bytes (TMA's
    stride rule; the 30B down's 6 blocks stored as 8) -> [A, N, 8] f32 (column 0). CTA (r, a): 64 rows of expert
    groups[a], all of K; the expert id is read first (its TMA row start depends on it)."""
    a_count, _, k = hq_a8k.shape
    n = w_all.shape[1]
    chunks = k // CK
    swizzled = (plgpu.TilingTransform((8, CK)), plgpu.SwizzleTransform(128))
    # a copy moves a multiple of 128 bytes (the warpgroup's threads): pad the small operands
    groups_a = jnp.pad(groups_a.astype(jnp.int32), (0, -a_count % 32))
    sh_akb = jnp.pad(sh_akb, ((0, 0), (0, -sh_akb.shape[1] % 32)))

    def body(x_hbm, sx_hbm, g_hbm, w_hbm, s_hbm, o_hbm, w_smem, x_smem, sx_smem, g_smem, s_smem, o_smem,
             bar_g, bar_w, bar_x):
        r, a = jax.lax.axis_index("r"), jax.lax.axis_index("a")
        plgpu.copy_gmem_to_smem(g_hbm, g_smem, bar_g)
        for j in range(chunks):   # x needs no expert id: in flight while the id arrives
            plgpu.copy_gmem_to_smem(x_hbm.at[a, :, pl.ds(j * CK, CK)], x_smem.at[j], bar_x)
        plgpu.copy_gmem_to_smem(sx_hbm.at[a], sx_smem, bar_x)
        plgpu.barrier_wait(bar_g)
        e = g_smem[a]
        for j in range(chunks):
            plgpu.copy_gmem_to_smem(w_hbm.at[e, pl.ds(r * BM, BM), pl.ds(j * CK, CK)], w_smem.at[j], bar_w)
        plgpu.copy_gmem_to_smem(s_hbm.at[e], s_smem, bar_w)
        plgpu.barrier_wait(bar_x)
        plgpu.barrier_wait(bar_w)
        _promoted_wgmma_chunks(w_smem, x_smem, chunks,
                               lambda j: s_smem[(r * BM) // BLOCK, j * CK // BLOCK] * sx_smem[j * CK // BLOCK],
                               o_smem, o_hbm.at[a, pl.ds(r * BM, BM)])

    return plgpu.kernel(
        body, out_type=jax.ShapeDtypeStruct((a_count, n, 8), jnp.float32),
        scratch_types=[plgpu.SMEM((chunks, BM, CK), w_all.dtype, transforms=swizzled),
                       plgpu.SMEM((chunks, 8, CK), hq_a8k.dtype, transforms=swizzled),
                       plgpu.SMEM(sh_akb.shape[1:], jnp.float32), plgpu.SMEM(groups_a.shape, jnp.int32),
                       plgpu.SMEM(s_all.shape[1:], jnp.float32), plgpu.SMEM((BM, 8), jnp.float32),
                       plgpu.Barrier(num_arrivals=1), plgpu.Barrier(num_arrivals=chunks + 1),
                       plgpu.Barrier(num_arrivals=chunks + 1)],
        grid=(n // BM, a_count), grid_names=("r", "a"),
    )(hq_a8k, sh_akb, groups_a, w_all, s_all)


def quantize_x(x_k):
    """x [K] -> ([8, K] e4m3 with row 0 = x quantized per 128-group as the model's W8A8 kernels
    do (gemv.quantize_rows), rows 1-7 zero: wgmma's narrowest N; [K / 128] f32 scales)."""
    xq, sx = quantize_rows(x_k[None], BLOCK)
    return jnp.pad(xq, ((0, 7), (0, 0))), sx[0]


def reference(x_k, w, s):
    """float64: x @ (w * block scales)^T -> [N]."""
    wd = np.asarray(w.astype(jnp.float32), np.float64) * np.repeat(np.repeat(np.asarray(s, np.float64), BLOCK, 0), BLOCK, 1)
    return wd @ np.asarray(x_k.astype(jnp.float32), np.float64)


def _us_per_call(one, args) -> float:
    """Device microseconds per `one(*args, layer)` call, over LAYERS calls that each read their
    own layer's weights from HBM, as the model's layers do. Each call is a kernel of its own name;
    the XLA glue between them ("*fusion*") is not counted."""
    from qwen3_jax.kernels.tune import device_timeline

    @jax.jit
    def run(*args):
        acc = jnp.float32(0)
        for i in range(LAYERS):
            first = (args[0].astype(jnp.float32) + 0.0 * acc).astype(args[0].dtype)   # keeps the calls in order
            acc = acc + one(first, *args[1:], i)
        return acc
    tl = device_timeline(lambda: run(*args))
    return sum(ns for name, (_, ns) in tl["by_name"].items()
               if "fusion" not in name and "memcpy" not in name.lower()) / LAYERS / 1e3


def main():
    from benchmarks.l2_warm import case
    from serve.bench import measure_ceilings
    bw = measure_ceilings(True, reps=20)["bandwidth"]
    print(f"device {jax.devices()[0].device_kind}; copy {bw / 1e12:.3f} TB/s (best call)", flush=True)
    n, k = 2048, 4096
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    w_all = jax.random.normal(k1, (LAYERS, n, k), jnp.float32).astype(jnp.float8_e4m3fn)
    s_all = jax.random.uniform(k2, (LAYERS, n // BLOCK, k // BLOCK), jnp.float32, 0.01, 0.03)
    x = jax.random.normal(k3, (k,), jnp.bfloat16)
    want = reference(x, w_all[3], s_all[3])
    for split in (8,):   # run 66 timed 2 and 4 too: 13.71 and 7.45 us
        got = np.asarray(jnp.sum(jax.jit(lambda x, w, s: tma_gemv(x, w, s, 3, split=split))(x, w_all, s_all), axis=0))
        err = np.linalg.norm(got - want) / np.linalg.norm(want)
        us = _us_per_call(lambda x, w, s, i: tma_gemv(x, w, s, i, split=split)[0, 0], (x, w_all, s_all))
        print(f"  tma gemv split {split}: rel err {err:.2e}, {us:6.2f} us per gemv (floor {n * k / bw * 1e6:5.2f})",
              flush=True)
    xq, sx = quantize_x(x)
    # W8A8's exact answer: the quantized x, dequantized
    want8 = reference((xq[0].astype(jnp.float32).reshape(-1, BLOCK) * sx[:, None]).reshape(-1), w_all[3], s_all[3])
    for split in (4, 8):
        try:
            got = np.asarray(jnp.sum(jax.jit(lambda a, b, w, s_: tma_gemv_w8a8(a, b, w, s_, 3, split=split))(
                xq, sx, w_all, s_all)[:, :, 0], axis=0))
        except Exception as e:   # a lowering the CPU check could not see must not hide the rest
            print(f"  w8a8 split {split} FAILED: {type(e).__name__}: {str(e)[:800]}", flush=True)
            continue
        err = np.linalg.norm(got - want8) / np.linalg.norm(want8)
        err_x = np.linalg.norm(got - want) / np.linalg.norm(want)
        us = _us_per_call(lambda a, b, w, s_, i: tma_gemv_w8a8(a, b, w, s_, i, split=split)[0, 0, 0],
                          (xq, sx, w_all, s_all))
        print(f"  tma w8a8 wgmma split {split}: rel err {err:.2e} to W8A8's own answer ({err_x:.2e} to bf16 x), "
              f"{us:6.2f} us per gemv (floor {n * k / bw * 1e6:5.2f})", flush=True)
    # the model's o_proj gemv (Pallas Triton, linear.PROJECTION_TILES for FP8 [out, in])
    case("fp8 o_proj", k, n, 1, "n", True, False, bw, w_nk=True, bk=256, num_warps=8)
    routed_down(bw)


def routed_down(bw):
    """The MoE down at batch 1 (8 assignments, 8 distinct experts per layer, [2048, 768] each)
    against the model's Triton gemv on the same shapes (l2_warm's case, the w_nk defaults)."""
    from benchmarks.l2_warm import case
    n, k, a, stride = 2048, 768, 8, 16
    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    w_all = jax.random.normal(k1, (LAYERS * stride, n, k), jnp.float32).astype(jnp.float8_e4m3fn)
    # scale rows padded from 6 to 8 blocks: TMA wants 16-byte strides (see tma_gemv_routed_w8a8)
    s_all = jax.random.uniform(k2, (LAYERS * stride, n // BLOCK, 8), jnp.float32, 0.01, 0.03)
    h = jax.random.normal(k3, (a, k), jnp.bfloat16)
    hq, sh = jax.vmap(quantize_x)(h)                                    # [A, 8, K], [A, K / 128]
    groups = 3 * stride + jnp.arange(a, dtype=jnp.int32)
    got = np.asarray(jax.jit(tma_gemv_routed_w8a8)(hq, sh, groups, w_all, s_all)[:, :, 0])
    want = np.stack([reference((hq[i, 0].astype(jnp.float32).reshape(-1, BLOCK) * sh[i][:, None]).reshape(-1),
                               w_all[int(groups[i])], s_all[int(groups[i])][:, :k // BLOCK]) for i in range(a)])
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    us = _us_per_call(lambda hq, sh, w, s_, i: tma_gemv_routed_w8a8(
        hq, sh, i * stride + jnp.arange(a, dtype=jnp.int32), w, s_)[0, 0, 0], (hq, sh, w_all, s_all))
    print(f"  tma routed w8a8 (MoE down, 8 experts): rel err {err:.2e} to W8A8's float64 answer, {us:6.2f} us "
          f"per gemv (floor {a * n * k / bw * 1e6:5.2f})", flush=True)
    case("fp8 moe_down", k, n, a, "n", True, False, bw, w_nk=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["routed"]:   # the MoE down form only (run 68)
        from serve.bench import measure_ceilings
        routed_down(measure_ceilings(True, reps=20)["bandwidth"])
    else:
        main()
