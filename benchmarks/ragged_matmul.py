"""The MoE's prefill matmuls (bf16) three ways, one process, GPU only: the model's Pallas Triton
grouped matmul (kernels/grouped_matmul.py: gate/up as a pair with the SwiGLU in its epilogue,
then the down), jax's Mosaic GPU ragged dot (jax.experimental.pallas.ops.gpu.ragged_dot_mgpu:
warpgroup MMAs fed by TMA; gate and up as one [E, D, 2F] weight, the SwiGLU in XLA between)
and XLA's lax.ragged_dot, against cuBLAS on one dense matmul of the same rows (the ceiling).

The Triton kernel runs in both grid orders (grouped_matmul's n_first: a block's N tiles side by
side, or one N tile's blocks). The question (NOTES, run 156): how far the Triton kernels' tiles are from what Hopper's
asynchronous MMAs give at these shapes, before porting the FP8 (W8A8, block-scaled) grouped
matmul to Mosaic GPU. Rows are the prompt's token-expert assignments of random top-k routing,
sorted by expert and padded per expert to the model's block height (moe_blocks.block_rows), as
the blocks path holds them; every variant multiplies the same padded rows, and LAYERS layers of
distinct weights run in one call so the weights stream from HBM.

    python benchmarks/ragged_matmul.py --tokens 1024,8192
    python benchmarks/ragged_matmul.py --fp8 --tokens 8192

--fp8 times the FP8 checkpoints' form instead: the model's W8A8 grouped matmuls (e4m3 x and
weights, block-128 scales, h quantized in the gate/up epilogue) against cuBLAS's e4m3 matmul of
the same rows with one scale a tensor, next to the card's bf16 and e4m3 matmul rates.
"""

import argparse
import functools
import inspect
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LAYERS = 4


def padded_groups(tokens: int, experts: int, top_k: int, bm: int, seed: int = 0):
    """Random top-k routing of `tokens` tokens -> (rows per expert padded to multiples of bm [E],
    real assignments per expert [E], each assignment's token in expert order [tokens * top_k]) as
    numpy int32."""
    import numpy as np

    rng = np.random.default_rng(seed)
    choice = np.argsort(rng.random((tokens, experts)), axis=1)[:, :top_k]   # k distinct experts a token
    real = np.bincount(choice.reshape(-1), minlength=experts).astype(np.int32)
    token_of = (np.argsort(choice.reshape(-1), kind="stable") // top_k).astype(np.int32)
    return (-(-real // bm) * bm).astype(np.int32), real, token_of


def prompt_rows(tokens: int, args, key, bm: int | None = None):
    """A `tokens`-token prompt's MoE rows as the blocks path's matmuls see them (gathered here
    before the timed calls, where the model's gate/up kernel gathers them itself; pad rows
    computed too, where the model's down skips them) -> (assignments, bm, rows per expert padded
    to bm [E] and real ones [E] (numpy), each block's expert [NB] int32, x [rows, D] bf16 (each
    real row its token's x, pad rows zero), the FLOPs of LAYERS layers' gate/up + down over the
    real assignments). bm: the block height (default: the model's, moe_blocks.block_rows); the
    tokens and their routing do not depend on it, so outputs of different bm compare row for row
    over the real rows."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from qwen3_jax.kernels.moe_blocks import block_rows

    e, k = args.experts, args.top_k
    a = tokens * k
    bm = bm or block_rows(a // e)
    sizes_np, real, token_of = padded_groups(tokens, e, k, bm)
    groups_b = jnp.asarray(np.repeat(np.arange(e, dtype=np.int32), sizes_np // bm))
    x_tok = jax.random.normal(key, (tokens, args.d), jnp.float32).astype(jnp.bfloat16)
    x = jnp.zeros((int(sizes_np.sum()), args.d), jnp.bfloat16).at[np.flatnonzero(real_rows(sizes_np, real))].set(
        x_tok[token_of])
    return a, bm, sizes_np, real, groups_b, x, 2 * a * args.d * 3 * args.f * LAYERS


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", default="1024,8192", help="prompt lengths, comma-separated")
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--d", type=int, default=2048, help="hidden size (30B-A3B: 2048)")
    p.add_argument("--f", type=int, default=768, help="expert FFN size (30B-A3B: 768)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--mgpu", default="128:128:64:4:1,128:256:64:4:1,128:128:64:4:4,64:128:64:4:1",
                   help="ragged_dot_mgpu configs block_m:block_n:block_k:max_concurrent_steps:grid_block_n")
    p.add_argument("--triton-only", action="store_true",
                   help="the Triton kernel in its two grid orders (kernels.grouped_matmul n_first) only")
    p.add_argument("--fp8", action="store_true",
                   help="FP8 instead: the model's W8A8 grouped matmuls (e4m3 x and weights, block-128 scales) "
                        "against cuBLAS's e4m3 matmul of the same rows (one scale a tensor), and the e4m3 "
                        "matmul rate of this card")
    p.add_argument("--variants", default="[{}]",
                   help='--fp8: a JSON list of gate/up tile overrides (kernels.grouped_matmul.matmul_tiles keys, '
                        '"bm" for the block height, "down" for the down\'s own), e.g. '
                        '\'[{}, {"bn": 64}, {"bm": 64, "num_stages": 4}]\'')
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from qwen3_jax import kernels
    from qwen3_jax.kernels.grouped_matmul import grouped_matmul, matmul_tiles
    from serve.bench import measure_ceilings, median_seconds

    if not kernels.on_gpu():
        raise SystemExit("ragged_matmul.py times GPU kernels (Mosaic GPU, Triton): run it on a GPU")
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu

    e, d, f, k = args.experts, args.d, args.f, args.top_k
    if args.fp8:
        return fp8_main(args)
    rate = measure_ceilings(True)["matmul_flops"]
    print(f"device {jax.devices()[0].device_kind}; jax {jax.__version__}; E={e} D={d} F={f} top-{k}; "
          f"bf16 matmul {rate / 1e12:.1f} TFLOP/s (this run); ragged_dot_mgpu{inspect.signature(ragged_dot_mgpu.ragged_dot)}",
          flush=True)
    key = jax.random.split(jax.random.key(0), 3)
    # Per-layer arrays, each its own buffer, passed as arguments: captured, XLA folds GBs of
    # constants (run 156); sliced out of a stacked array inside the call, each layer's weights are
    # copied before the kernels read them (~650 us a layer, which runs 157-158 carried).
    gate_up = [(0.02 * jax.random.normal(kl, (e, d, 2 * f), jnp.float32)).astype(jnp.bfloat16)
               for kl in jax.random.split(key[0], LAYERS)]
    down = [(0.02 * jax.random.normal(kl, (e, f, d), jnp.float32)).astype(jnp.bfloat16)
            for kl in jax.random.split(key[1], LAYERS)]
    gate, up = [w[..., :f] for w in gate_up], [w[..., f:] for w in gate_up]
    weights = (gate_up, gate, up, down)

    def swiglu(h):
        return (jax.nn.silu(h[:, :f].astype(jnp.float32)) * h[:, f:].astype(jnp.float32)).astype(jnp.bfloat16)

    for tokens in [int(t) for t in args.tokens.split(",") if t]:
        a, bm, sizes_np, real, groups_b, x, flops = prompt_rows(tokens, args, key[2])
        rows, sizes = x.shape[0], jnp.asarray(sizes_np)
        t1 = matmul_tiles(d, f, bm, False, "k", 128)
        t2 = matmul_tiles(f, d, bm, False, "n", 128)
        print(f"{tokens} tokens: {a} assignments, {rows} rows padded to bm={bm} (max {real.max()} / min "
              f"{real.min()} an expert); Triton tiles gate/up {t1}, down {t2}", flush=True)

        def triton(n_first, x, gate_up, gate, up, down):
            out = []
            for i in range(LAYERS):
                h = grouped_matmul(x, groups_b, (gate[i], up[i]), bm=bm, layout="k", block=128,
                                   **dict(t1, n_first=n_first))
                out.append(grouped_matmul(h, groups_b, (down[i],), bm=bm, layout="n", block=128,   # bf16 rows: the model's
                                          out_dtype=jnp.bfloat16, **dict(t2, n_first=n_first)))
            return out

        def mgpu(cfg_gu, cfg_dn, x, gate_up, gate, up, down):
            rd = functools.partial(ragged_dot_mgpu.ragged_dot, group_sizes=sizes)
            return [rd(swiglu(rd(x, gate_up[i], **cfg_gu)), down[i], **cfg_dn) for i in range(LAYERS)]

        def xla(x, gate_up, gate, up, down):
            rd = functools.partial(jax.lax.ragged_dot, group_sizes=sizes)
            return [rd(swiglu(rd(x, gate_up[i])), down[i]) for i in range(LAYERS)]

        def dense(x, gate_up, gate, up, down):   # one expert's weights for every row: the same FLOPs per row through cuBLAS
            return [jnp.dot(swiglu(jnp.dot(x, gate_up[i][0])), down[i][0]) for i in range(LAYERS)]

        variants = {"triton grouped_matmul": functools.partial(triton, t1["n_first"]),
                    "triton, the other order": functools.partial(triton, not t1["n_first"])}
        if not args.triton_only:
            variants.update({"xla ragged_dot": xla, "cublas dense (ceiling)": dense})
        names = ("block_m", "block_n", "block_k", "max_concurrent_steps", "grid_block_n")
        for spec in [s for s in args.mgpu.split(",") if s]:
            cfg = dict(zip(names, (int(v) for v in spec.split(":"))))
            dn = dict(cfg, grid_block_n=1 if d % (cfg["grid_block_n"] * cfg["block_n"]) else cfg["grid_block_n"])
            if not args.triton_only:
                variants[f"mgpu {spec}"] = functools.partial(mgpu, cfg, dn)
        ref, mask = None, real_rows(sizes_np, real)
        for name, fn in variants.items():
            try:
                call = jax.jit(fn)
                out = call(x, *weights)
                if ref is None:
                    ref = [np.asarray(o, np.float32) for o in out]
                err = max(float(np.linalg.norm(np.asarray(o, np.float32)[mask] - r[mask]) / np.linalg.norm(r[mask]))
                          for o, r in zip(out, ref))
                s = median_seconds(lambda: call(x, *weights), args.reps)
            except Exception as exc:   # a config over shared memory, an API this jax lacks
                print(f"  {name:28s} FAILED {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                continue
            print(f"  {name:28s} {1e6 * s / LAYERS:9.1f} us a layer  {100 * flops / s / rate:5.1f}% of matmul  "
                  f"rel. err {0.0 if name.startswith('cublas') else err:.1e}", flush=True)


def fp8_main(args):
    """--fp8: W8A8 gate/up (SwiGLU and the e4m3 quantize of h in its epilogue) + down, as the
    model runs them (experts stored [E, out, in], one weight scale a tile), against cuBLAS on one
    dense e4m3 matmul of the same rows; % of the bf16 and the e4m3 matmul rates of this run."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from qwen3_jax import kernels
    from qwen3_jax.kernels.grouped_matmul import grouped_matmul, matmul_tiles
    from qwen3_jax.kernels.x_quantize import quantize_x
    from serve.bench import best_seconds, measure_ceilings, median_seconds

    e, d, f, k, blk = args.experts, args.d, args.f, args.top_k, 128
    e4m3 = jnp.float8_e4m3fn
    gpu = kernels.on_gpu()   # a CPU call (interpret mode, small --d / --f) only checks that it runs
    rate = measure_ceilings(gpu)["matmul_flops"]
    m = 8192 if gpu else 256
    key = jax.random.split(jax.random.key(0), 8)
    a8, b8 = (jax.random.normal(kk, (m, m), jnp.float32).astype(e4m3) for kk in key[:2])
    nt = (((1,), (1,)), ((), ()))   # both operands K-contiguous: cuBLAS's e4m3 layout
    mm8 = jax.jit(lambda p, q: jax.lax.dot_general(p, q, nt, preferred_element_type=jnp.bfloat16))
    rate8 = 2 * m ** 3 / best_seconds(lambda: mm8(a8, b8), 20)
    print(f"device {jax.devices()[0].device_kind}; jax {jax.__version__}; E={e} D={d} F={f} top-{k}; matmul "
          f"bf16 {rate / 1e12:.1f}, e4m3 {rate8 / 1e12:.1f} TFLOP/s (this run)", flush=True)

    def experts(kk, shape, coarse, run_axis):
        """e4m3 weights [E, out, in] per layer and float32 scales expanded from `coarse` in runs of
        blk along run_axis (a checkpoint's block scales as the model holds them)."""
        kw, ks = jax.random.split(kk)
        w = [jax.random.normal(kl, shape, jnp.float32).astype(e4m3) for kl in jax.random.split(kw, LAYERS)]
        s = [jnp.repeat(jax.random.uniform(kl, coarse, jnp.float32, 0.01, 0.03), blk, axis=run_axis)
             for kl in jax.random.split(ks, LAYERS)]
        return w, s
    gate, gs = experts(key[2], (e, f, d), (e, d // blk, f // blk), 2)   # layout "k" scales [E, D/blk, F]
    up, us = experts(key[3], (e, f, d), (e, d // blk, f // blk), 2)
    down, ds_ = experts(key[4], (e, d, f), (e, f // blk, d // blk), 1)  # layout "n" scales [E, F, D/blk]
    weights = (gate, up, down, gs, us, ds_)

    for tokens in [int(t) for t in args.tokens.split(",") if t]:
        ref = None
        for v in json.loads(args.variants):
            v = dict(v)
            bm_v, dn = v.pop("bm", None), v.pop("down", {})
            a, bm, sizes_np, real, groups_b, x, flops = prompt_rows(tokens, args, key[5], bm_v)
            t1 = matmul_tiles(d, f, bm, True, "k", blk, w_nk=True, **v)
            t2 = matmul_tiles(f, d, bm, True, "n", blk, w_nk=True, **dn)
            t2 = dict(t2, bk=math.gcd(t2["bk"], t1["bn"], blk))
            print(f"{tokens} tokens: {a} assignments, {x.shape[0]} rows padded to bm={bm}; tiles gate/up {t1}, "
                  f"down {t2}", flush=True)

            def gate_up(x, gate, up, gs, us, t1=t1, bm=bm, groups_b=groups_b):   # -> [(h, its scales)] a layer
                xq, sx = quantize_x(x, t1["bk"])
                return [grouped_matmul(xq, groups_b, (gate[i], up[i]), (gs[i], us[i]), bm=bm, layout="k", block=blk,
                                       w_nk=True, x_scales=sx, quantize_out=True, scale_run=blk, **t1)
                        for i in range(LAYERS)]

            def w8a8(x, gate, up, down, gs, us, ds_, gate_up=gate_up, t2=t2, bm=bm, groups_b=groups_b):
                return [grouped_matmul(h, groups_b, (down[i],), (ds_[i],), bm=bm, layout="n", block=blk, w_nk=True,
                                       x_scales=hs, out_dtype=jnp.bfloat16, **t2)   # bf16 rows: the model's
                        for i, (h, hs) in enumerate(gate_up(x, gate, up, gs, us))]

            mask = real_rows(sizes_np, real)
            try:
                call, call_gu = jax.jit(w8a8), jax.jit(gate_up)
                out = [np.asarray(o, np.float32)[mask] for o in call(x, *weights)]
                s = median_seconds(lambda: call(x, *weights), args.reps)
                s_gu = median_seconds(lambda: call_gu(x, gate, up, gs, us), args.reps)
            except Exception as exc:   # a tiling over shared memory or registers
                print(f"  FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                continue
            ref = out if ref is None else ref
            err = max(float(np.linalg.norm(o - r) / np.linalg.norm(r)) for o, r in zip(out, ref))
            print(f"  {'triton W8A8 grouped_matmul':28s} {1e6 * s / LAYERS:9.1f} us a layer  {100 * flops / s / rate:5.1f}% "
                  f"of bf16 matmul  {100 * flops / s / rate8:5.1f}% of e4m3  (gate/up {1e6 * s_gu / LAYERS:.1f} us)  "
                  f"rel. err against the first variant {err:.1e}", flush=True)

        def dense8(x, gate, up, down, gs, us, ds_):   # expert 0's weights for every row, one scale a tensor
            xq = x.astype(e4m3)
            out = []
            for i in range(LAYERS):
                gu = jax.lax.dot_general(xq, jnp.concatenate([gate[i][0], up[i][0]]), nt,
                                         preferred_element_type=jnp.float32)
                h = (jax.nn.silu(gu[:, :f]) * gu[:, f:] / 1024).astype(e4m3)   # inside e4m3's range
                out.append(jax.lax.dot_general(h, down[i][0], nt, preferred_element_type=jnp.bfloat16))
            return out

        call = jax.jit(dense8)
        _, _, _, _, _, x, flops = prompt_rows(tokens, args, key[5])   # the model's rows, whatever the last variant's bm
        ok = all(bool(jnp.isfinite(o).all()) for o in call(x, *weights))
        s = median_seconds(lambda: call(x, *weights), args.reps)
        print(f"  {'cublas e4m3 dense (ceiling)':28s} {1e6 * s / LAYERS:9.1f} us a layer  {100 * flops / s / rate:5.1f}% "
              f"of bf16 matmul  {100 * flops / s / rate8:5.1f}% of e4m3  finite {ok}", flush=True)


def real_rows(sizes_np, real):
    """A mask over the padded rows: the real assignments of each expert (its first real[e] rows)."""
    import numpy as np

    starts = np.concatenate([[0], np.cumsum(sizes_np)[:-1]])
    mask = np.zeros(int(sizes_np.sum()), bool)
    for s0, n in zip(starts, real):
        mask[s0:s0 + n] = True
    return mask


if __name__ == "__main__":
    main()
