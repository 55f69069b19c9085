"""Microbenchmarks of the kernels at one MoE layer / projection of a real model's shapes, next
to the plain-XLA path and the HBM floor, and a tile sweep that installs the fastest settings
(gemv.GEMV_DEFAULTS, grouped_matmul.MATMUL_DEFAULTS, moe_ffn.GEMV_MAX_ASSIGNMENTS).

Used by `python -m serve.bench --sweep`. Weights are stacked over `layers` layers and one
timed call runs every layer in turn inside one jit (a fori_loop, as the model's scan does), so
the 50 MB L2 never holds a layer's weights and per-call dispatch is spread over the layers.
Weight arrays are jit arguments (a closed-over array would be baked into the executable).
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from ..fp8 import dequantize
from ..moe import expert_ffn
from . import gemv as gemv_mod
from . import grouped_matmul as gm_mod
from . import moe_ffn as moe_mod

GEMV_VARIANTS = [{}, dict(bn=32), dict(acc2d=False), dict(bk=64, bn=128),
                 dict(mode="dot"), dict(mode="dot", bn=128), dict(mode="dot", bn=32),
                 dict(mode="dot", target_programs=528), dict(mode="dot", num_warps=8, bn=128),
                 dict(mode="dot", max_split=1)]
GEMV_FP8_VARIANTS = GEMV_VARIANTS + [dict(convert="bits"), dict(convert="bits", bn=32),
                                     dict(mode="dot", convert="f16"), dict(mode="dot", convert="f16", bn=128),
                                     dict(mode="dot", convert="f16", num_warps=8, bn=128),
                                     dict(mode="dot", convert="f16", bk=64, bn=128)]
# W8A8 (convert="e4m3"): other numerics, so timed and checked at their own bound but never
# installed by the sweep (kernels.set_fp8_gemm chooses them).
GEMV_W8A8_VARIANTS = [dict(mode="dot", convert="e4m3", bk=128, bn=128), dict(mode="dot", convert="e4m3", bk=64, bn=128),
                      dict(mode="dot", convert="e4m3", bk=128, bn=64), dict(mode="dot", convert="e4m3", bk=128, bn=128,
                                                                          num_warps=8),
                      dict(mode="dot", convert="e4m3", bk=128, bn=128, max_split=4),
                      dict(mode="dot", convert="e4m3", bk=128, bn=128, num_stages=4)]
W8A8_TOL = 6e-2   # e4m3 activations: ~3% relative per product on random data
SMALL_MATMUL_VARIANTS = [{}, dict(bn=32), dict(bn=128)]
LARGE_MATMUL_VARIANTS = [{}, dict(bn=64, num_warps=4)]


def median_time(fn, args, reps: int = 10, warmup: int = 1) -> float:
    """Median seconds of fn(*args) (device-synchronized), warm-up calls excluded."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def profile_data(call):
    """One run of `call` under the profiler -> jax.profiler.ProfileData (every device and host
    thread), or None when no trace was written."""
    import glob
    import os
    import tempfile

    with tempfile.TemporaryDirectory(prefix="qwen3_prof_") as d:
        with jax.profiler.trace(d):
            jax.block_until_ready(call())
        paths = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
        return jax.profiler.ProfileData.from_file(paths[0]) if paths else None


def device_timeline(call):
    """Run `call` once under the profiler (after one untraced run) and read the first GPU's
    stream lines: {"by_name": {kernel: (count, total ns)}, "details": {kernel: CUPTI's launch
    details (registers, shared memory, grid, block, occupancy) where the trace has them},
    "lines", "first_ns", "last_ns"}, or None when no trace was written. Device time per kernel,
    without host or launch gaps."""
    jax.block_until_ready(call())
    data = profile_data(call)
    if data is None:
        return None
    by_name, details, lines, first, last = {}, {}, set(), None, None
    # One device's timeline (the first GPU): on a mesh every device runs the same program.
    gpus = sorted(p.name for p in data.planes if p.name.startswith("/device:GPU"))
    for plane in data.planes:
        if not gpus or plane.name != gpus[0]:
            continue
        for line in plane.lines:
            if not line.name.startswith("Stream"):
                continue
            lines.add(line.name)
            for ev in line.events:
                n, dur = by_name.get(ev.name, (0, 0.0))
                by_name[ev.name] = (n + 1, dur + ev.duration_ns)
                if ev.name not in details:
                    details[ev.name] = next((str(v) for k, v in ev.stats if k == "kernel_details"), "")
                first = ev.start_ns if first is None else min(first, ev.start_ns)
                last = ev.start_ns + ev.duration_ns if last is None else max(last, ev.start_ns + ev.duration_ns)
    return {"by_name": by_name, "details": details, "lines": lines, "first_ns": first, "last_ns": last}


def random_experts(key, layers, e, d, f, fp8: bool, block=128):
    """Stacked [L*E, ...] expert weights (bf16, or FP8 + float32 scales) created on the device."""
    ks = jax.random.split(key, 3)

    def mk(k, shape, block_axis):
        if not fp8:
            return (0.02 * jax.random.normal(k, shape, jnp.float32)).astype(jnp.bfloat16), None
        w = jax.random.normal(k, shape, jnp.float32).astype(jnp.float8_e4m3fn)
        s_shape = list(shape)
        s_shape[block_axis] = -(-shape[block_axis] // block)
        return w, jnp.full(s_shape, 0.02, jnp.float32)

    (g, gs), (u, us), (dn, ds) = (mk(ks[0], (layers * e, d, f), 1), mk(ks[1], (layers * e, d, f), 1),
                                  mk(ks[2], (layers * e, f, d), 2))
    return moe_mod.ExpertArrays(g, u, dn, gs, us, ds, block=block, num_experts=e)


def routing(key, n, e, k):
    """Uniform routing: each token a random set of k distinct experts, weights summing to 1."""
    k1, k2 = jax.random.split(key)
    experts = jnp.argsort(jax.random.uniform(k1, (n, e)), axis=1)[:, :k].astype(jnp.int32)
    w = jax.random.uniform(k2, (n, k), minval=0.1, maxval=1.0)
    return w / w.sum(axis=1, keepdims=True), experts


def expert_bytes(arrays) -> int:
    """Bytes of one expert (gate + up + down, with scales)."""
    n = 0
    for a in (arrays.gate, arrays.up, arrays.down, arrays.gate_scale, arrays.up_scale, arrays.down_scale):
        if a is not None:
            n += a.nbytes // a.shape[0]
    return n


def _tensors(arrays):
    return (arrays.gate, arrays.up, arrays.down, arrays.gate_scale, arrays.up_scale, arrays.down_scale)


def _over_layers(layer_fn, layers):
    """jit (x, w, experts, tensors) -> sum over layers of layer_fn(x, w, experts, tensors, layer)."""
    @jax.jit
    def run(x, w, experts, tensors):
        def body(layer, acc):
            return acc + layer_fn(x, w, experts, tensors, layer).astype(jnp.float32)
        return jax.lax.fori_loop(0, layers, body, jnp.zeros(x.shape, jnp.float32))
    return run


def moe_layer_fn(arrays, strategy, gemv_cfg=None, matmul_cfg=None, layers=1):
    """Kernels, tiles overridden; see _over_layers."""
    e, block = arrays.num_experts, arrays.block

    def layer_fn(x, w, experts, t, layer):
        with _override(gemv_cfg, matmul_cfg):
            arr = moe_mod.ExpertArrays(*t, block=block, num_experts=e, offset=layer * e, w_nk=arrays.w_nk)
            return moe_mod.moe_ffn(x, w, experts, arr, strategy=strategy)
    return _over_layers(layer_fn, layers)


def xla_layer_fn(arrays, layers=1):
    """The plain-XLA reference (sort + ragged_dot over the layer's experts, FP8 dequantized)."""
    e, block = arrays.num_experts, arrays.block

    def layer_fn(x, w, experts, t, layer):
        def sl(a):
            return jax.lax.dynamic_slice_in_dim(a, layer * e, e, 0)
        mats = []
        for wt, sc, ax in ((t[0], t[3], 1), (t[1], t[4], 1), (t[2], t[5], 2)):
            mats.append(sl(wt) if sc is None else dequantize(sl(wt), sl(sc), ax, block, x.dtype))
        return expert_ffn(x, w, experts, *mats)
    return _over_layers(layer_fn, layers)


class _override:
    """Temporarily replace the default tile dicts (read at trace time)."""

    def __init__(self, gemv_cfg, matmul_cfg):
        self.g, self.m = gemv_cfg, matmul_cfg

    def __enter__(self):
        self.saved = ({k: dict(v) for k, v in gemv_mod.GEMV_DEFAULTS.items()},
                      {k: dict(v) for k, v in gm_mod.MATMUL_DEFAULTS.items()})
        for key, cfg in (self.g or {}).items():
            gemv_mod.GEMV_DEFAULTS[key].update(cfg)
        for key, cfg in (self.m or {}).items():   # a variant's keys win over the FP8 [N, K] overrides too
            d = gm_mod.MATMUL_DEFAULTS[key]
            d.update(cfg, fp8_nk={**d.get("fp8_nk", {}), **cfg})

    def __exit__(self, *exc):
        gemv_mod.GEMV_DEFAULTS.clear()
        gemv_mod.GEMV_DEFAULTS.update(self.saved[0])
        gm_mod.MATMUL_DEFAULTS.clear()
        gm_mod.MATMUL_DEFAULTS.update(self.saved[1])


def sweep_moe(bandwidth: float, *, e=128, d=2048, f=768, k=8, layers=6, batches=(1, 8, 64, 256),
              prefill_tokens=8192, matmul_rate=None, log=print, install=True, reps=10):
    """Time one MoE layer for each dtype, batch and strategy/tile variant; return rows and (if
    `install`) put the fastest gemv/matmul settings and the gemv/blocks crossover in place."""
    rows = []
    best_cfg = {}
    for fp8 in (False, True):
        kind = "fp8" if fp8 else "bf16"
        arrays = random_experts(jax.random.key(1), layers, e, d, f, fp8)
        per_expert = expert_bytes(arrays)

        tensors = _tensors(arrays)

        def case(n, seed=0):
            w, ex = routing(jax.random.key(100 + n + seed), n, e, k)
            x = jax.random.normal(jax.random.key(7), (n, d), jnp.bfloat16)
            distinct = len(np.unique(np.asarray(ex)))
            return (x, w, ex, tensors), distinct

        refs = {}

        def record(label, n, fn, sets, distinct, cfg=None):
            try:
                if n not in refs:   # the plain-XLA result every kernel variant must reproduce
                    refs[n] = np.asarray(xla_layer_fn(arrays, layers)(*sets), np.float64)
                got = np.asarray(fn(*sets), np.float64)
                err = float(np.linalg.norm(got - refs[n]) / np.linalg.norm(refs[n]))
                t = median_time(fn, sets, reps=reps) / layers   # per layer
            except Exception as exc:  # a tiling Triton rejects: report and go on
                log(f"  {kind} n={n} {label}: FAILED {type(exc).__name__}: {str(exc)[:200]}")
                return None
            if not err < (W8A8_TOL if _w8a8(kind, cfg) else 2e-2):
                log(f"  {kind} n={n} {label}: WRONG, relative error {err:.3g} against XLA; not used")
                return None
            floor = distinct * per_expert / bandwidth
            row = dict(kind=kind, tokens=n, variant=label, us=t * 1e6, floor_us=floor * 1e6,
                       pct_floor=100 * floor / t, cfg=cfg or {}, rel_err=err)
            if n >= 1024 and matmul_rate:
                flops = 2 * n * k * 3 * d * f
                row["tflops"] = flops / t / 1e12
                row["pct_matmul"] = 100 * flops / t / matmul_rate
            rows.append(row)
            log(f"  {kind:4s} n={n:5d} {label:42s} {t * 1e6:9.1f} us  floor {floor * 1e6:7.1f} us  "
                f"{row['pct_floor']:5.1f}%  err {err:.1e}" + (f"  {row['pct_matmul']:.1f}% of matmul" if "pct_matmul" in row else ""))
            return t

        # 1. gemv tiles at batch 1 (8 assignments)
        sets, distinct = case(1)
        variants = GEMV_FP8_VARIANTS + GEMV_W8A8_VARIANTS if fp8 else GEMV_VARIANTS
        timings = []
        for v in variants:
            t = record(f"gemv {_fmt(v)}", 1, moe_layer_fn(arrays, "gemv", {kind: v}, layers=layers), sets, distinct, v)
            if t is not None and not _w8a8(kind, v):
                timings.append((t, v))
        best_g = min(timings, key=lambda p: p[0])[1] if timings else {}
        best_cfg[("gemv", kind)] = best_g
        # 2. small-block matmul tiles at batch 64
        sets64, distinct64 = case(64)
        timings = []
        for v in SMALL_MATMUL_VARIANTS:
            t = record(f"blocks {_fmt(v)}", 64, moe_layer_fn(arrays, "blocks", None, {"small": v}, layers=layers),
                       sets64, distinct64, v)
            if t is not None:
                timings.append((t, v))
        best_s = min(timings, key=lambda p: p[0])[1] if timings else {}
        best_cfg[("small", kind)] = best_s
        # 3. crossover and every batch: best gemv vs best blocks vs XLA
        cross, contiguous = 0, True
        for n in sorted(set(batches) | {4, 16, 32}):
            sets_n, distinct_n = case(n)
            tg = record("gemv best", n, moe_layer_fn(arrays, "gemv", {kind: best_g}, layers=layers), sets_n, distinct_n,
                        best_g) \
                if n * k <= 1024 else None
            tb = record("blocks best", n, moe_layer_fn(arrays, "blocks", None, {"small": best_s}, layers=layers), sets_n, distinct_n)
            if n in (1, 64) or n == max(batches):
                record("xla ragged_dot (reference)", n, xla_layer_fn(arrays, layers), sets_n, distinct_n)
            if contiguous and tg is not None and tb is not None and tg <= tb:
                cross = n * k          # gemv still wins at this many assignments
            else:
                contiguous = False
        best_cfg[("cross", kind)] = cross
        # 4. prefill-sized MoE layer on big blocks
        if prefill_tokens:
            sets_p, distinct_p = case(prefill_tokens)
            timings = []
            for v in LARGE_MATMUL_VARIANTS:
                t = record(f"blocks prefill {_fmt(v)}", prefill_tokens,
                           moe_layer_fn(arrays, "blocks", None, {"large": v}, layers=layers), sets_p, distinct_p, v)
                if t is not None:
                    timings.append((t, v))
            best_cfg[("large", kind)] = min(timings, key=lambda p: p[0])[1] if timings else {}
            record("xla ragged_dot (reference)", prefill_tokens, xla_layer_fn(arrays, layers), sets_p, distinct_p)
    if install:
        install_best(best_cfg, log)
    return rows, best_cfg


PREFILL_FP8_VARIANTS = [dict(convert="cast"), dict(convert="f16"), dict(convert="f16", bk=128),
                        dict(convert="f16", bk=128, num_stages=4), dict(convert="f16", num_stages=4),
                        dict(convert="f16", bn=256, bk=64, num_stages=3), dict(convert="f16", bn=64, num_warps=4)]


def sweep_prefill_matmul(matmul_rate: float, *, e=128, d=2048, f=768, k=8, layers=4, tokens=8192,
                         variants=None, nk=False, log=print, reps=5):
    """One FP8 MoE layer of a `tokens` prompt on the blocks path per "large" matmul variant
    (grouped_matmul tiles and FP8 MMA dtype; kernels.FP8_DEQUANTIZE_MOE_MIN_ROWS off, so the FP8
    kernel runs), then through the dequantized bf16 copy, against bf16 weights with the defaults:
    time per layer, % of the matmul rate, error against the plain-XLA layer. -> rows of dicts.
    nk: the FP8 experts stored [E, out, in], as the model holds them (the reference reads the
    same values in [E, in, out])."""
    from .. import kernels
    rows = []
    saved = kernels.FP8_DEQUANTIZE_MOE_MIN_ROWS
    for fp8 in (False, True):
        arrays = random_experts(jax.random.key(1), layers, e, d, f, fp8)
        w, ex = routing(jax.random.key(100 + tokens), tokens, e, k)
        sets = (jax.random.normal(jax.random.key(7), (tokens, d), jnp.bfloat16), w, ex, _tensors(arrays))
        ref = np.asarray(xla_layer_fn(arrays, layers)(*sets), np.float64)
        if fp8 and nk:
            sw = functools.partial(jnp.swapaxes, axis1=1, axis2=2)
            arrays = dataclasses.replace(arrays, gate=sw(arrays.gate), up=sw(arrays.up), down=sw(arrays.down),
                                         w_nk=True)
            sets = sets[:3] + (_tensors(arrays),)
        cases = [(v, 0) for v in variants or PREFILL_FP8_VARIANTS] + [({}, 1)] if fp8 else [({}, saved)]
        for v, min_rows in cases:
            fn = moe_layer_fn(arrays, "blocks", None, {"large": v}, layers=layers)
            kernels.FP8_DEQUANTIZE_MOE_MIN_ROWS = min_rows   # read at trace time: the first call below
            try:
                got = np.asarray(fn(*sets), np.float64)
                t = median_time(fn, sets, reps=reps) / layers
            except Exception as exc:
                log(f"  {'fp8' if fp8 else 'bf16'} {_fmt(v)}: FAILED {type(exc).__name__}: {str(exc)[:160]}")
                continue
            finally:
                kernels.FP8_DEQUANTIZE_MOE_MIN_ROWS = saved
            if fp8 and min_rows:
                v = {"dequantized": "bf16"}
            err = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
            pct = 100 * 2 * tokens * k * 3 * d * f / t / matmul_rate
            rows.append(dict(kind="fp8" if fp8 else "bf16", variant=_fmt(v), us=t * 1e6, pct_matmul=pct, rel_err=err))
            log(f"  {'fp8' if fp8 else 'bf16':4s} {_fmt(v):44s} {t * 1e6:8.1f} us per layer  {pct:5.1f}% of matmul  "
                f"err {err:.1e}")
    return rows


def install_best(best_cfg, log=print):
    for kind in ("bf16", "fp8"):
        gemv_mod.GEMV_DEFAULTS[kind].update(best_cfg.get(("gemv", kind), {}))
    # grouped_matmul tiles are shared by both weight kinds: take bf16's (FP8 reads half the bytes,
    # so bf16 is the more bandwidth-bound case) unless only FP8 was measured.
    for size in ("small", "large"):
        cfg = best_cfg.get((size, "bf16"), best_cfg.get((size, "fp8")))
        if cfg:
            gm_mod.MATMUL_DEFAULTS[size].update(cfg)
    for kd in ("bf16", "fp8"):
        if ("cross", kd) in best_cfg:
            moe_mod.GEMV_MAX_ASSIGNMENTS[kd] = max(8, best_cfg[("cross", kd)])
    log(f"installed: GEMV_DEFAULTS={gemv_mod.GEMV_DEFAULTS} MATMUL_DEFAULTS={gm_mod.MATMUL_DEFAULTS} "
        f"GEMV_MAX_ASSIGNMENTS={moe_mod.GEMV_MAX_ASSIGNMENTS}")


def sweep_fp8_linear(bandwidth: float, *, d=2048, h=32, q=128, layers=16, rows=(1, 8), log=print, reps=10):
    """q_proj-shaped FP8 projection: the fused kernel vs XLA bf16 and XLA dequantize-then-einsum
    (each call runs all `layers` layers in a fori_loop; times are per layer)."""
    from .linear import linear_einsum
    out = []
    w8 = jax.random.normal(jax.random.key(3), (layers, d, h, q), jnp.float32).astype(jnp.float8_e4m3fn)
    sc = jnp.full((layers, d // 128, h, q), 0.02, jnp.float32)
    wb = (0.02 * jax.random.normal(jax.random.key(4), (layers, d, h, q), jnp.float32)).astype(jnp.bfloat16)

    def looped(one):
        @jax.jit
        def run(x, w8, sc, wb):
            def body(i, acc):
                return acc + one(x, w8, sc, wb, i).astype(jnp.float32)
            return jax.lax.fori_loop(0, layers, body, jnp.zeros((*x.shape[:2], h, q), jnp.float32))
        return run

    fns = {
        "fp8 kernel": looped(lambda x, w8, sc, wb, i: linear_einsum(   # scale_run: the model's form
            "btd,dhq->bthq", x, w8, sc, 0, 128, layer=i, scale_run=128)),
        "xla fp8 dequantize+einsum": looped(lambda x, w8, sc, wb, i: jnp.einsum(
            "btd,dhq->bthq", x, dequantize(w8[i], sc[i], 0, 128, jnp.bfloat16))),
        "xla bf16 einsum": looped(lambda x, w8, sc, wb, i: jnp.einsum("btd,dhq->bthq", x, wb[i])),
    }
    for m in rows:
        x = jax.random.normal(jax.random.key(5), (1, m, d), jnp.bfloat16)
        for label, fn in fns.items():
            t = median_time(fn, (x, w8, sc, wb), reps=reps) / layers
            nbytes = d * h * q * (2 if "bf16" in label else 1) + (0 if "bf16" in label else sc.nbytes // layers)
            floor = nbytes / bandwidth
            out.append(dict(rows=m, variant=label, us=t * 1e6, floor_us=floor * 1e6, pct_floor=100 * floor / t))
            log(f"  q_proj m={m:3d} {label:28s} {t * 1e6:8.1f} us  floor {floor * 1e6:6.1f} us  {100 * floor / t:5.1f}%")
    return out


# Projection-shaped gemv sweep: tiles for the decode step's other GEMVs (q/k/v side by side,
# o_proj, the MoE down). Variants override GEMV_DEFAULTS[kind]; each is checked against the
# default's own result (the same numerics: convert is fixed by the variant list per kind).
SHAPE_VARIANTS = [{}, dict(max_split=16), dict(bn=64), dict(bn=64, max_split=16), dict(bk=128),
                  dict(bk=128, max_split=4), dict(num_warps=4), dict(num_warps=8), dict(num_stages=4),
                  dict(num_stages=2)]


def sweep_gemv_shapes(bandwidth: float, *, d=2048, heads=32, kv=4, hd=128, f=768, k=8, layers=16,
                      kinds=("bf16", "w8a16"), variants=None, shape_names=None, log=print):
    """Device time (profiler) of the decode step's gemv shapes at batch 1 per tile variant and kind:
    qkv (K=d, widths heads*hd, kv*hd, kv*hd, concat), o_proj (K=heads*hd, N=d), moe_gate_up
    (k rows, K=d, N=f pair), moe_down (k rows, K=f, N=d), and on request (`shape_names`)
    moe_down_joint (1 row, K=k*f, N=d: the bytes and K walk of a down whose programs each cover
    all k experts for their columns, as a combine in its epilogue would need). -> rows of
    dict(kind, shape, variant, us, pct_floor, rel_err)."""
    from .gemv import gemv, gemv_tiles
    from .linear import projection_tiles
    shapes = {"qkv": (d, (heads * hd, kv * hd, kv * hd), 1, "k", False),
              "o_proj": (heads * hd, (d,), 1, "n", False),
              "moe_gate_up": (d, (f, f), k, "k", True),
              "moe_down": (f, (d,), k, "n", False),
              "moe_down_joint": (k * f, (d,), 1, "n", False)}
    unknown = sorted(set(shape_names or ()) - set(shapes))
    if unknown:
        raise ValueError(f"unknown gemv shapes {unknown}; choose from {sorted(shapes)}")
    shapes = {name: shapes[name] for name in (shape_names or list(shapes)[:4])}
    out = []
    for kind in kinds:
        fp8 = kind != "bf16"
        base = dict(convert="e4m3" if kind == "w8a8" else "f16", mode="dot") if fp8 else {}
        for seed, (name, (kk, widths, rows, layout, pair)) in enumerate(shapes.items()):
            stride = 16 if rows > 1 else 1       # MoE rows: 8 distinct experts of 16 per layer
            g_count = layers * stride
            keys = jax.random.split(jax.random.key(seed), len(widths) + 1)
            ws, ss = [], []
            for key, n in zip(keys, widths):
                if fp8:
                    ws.append(jax.random.normal(key, (g_count, kk, n), jnp.float32).astype(jnp.float8_e4m3fn))
                    ss.append(jnp.full((g_count, -(-kk // 128), n) if layout == "k" else (g_count, kk, -(-n // 128)),
                                       0.02, jnp.float32))
                else:
                    ws.append((0.02 * jax.random.normal(key, (g_count, kk, n), jnp.float32)).astype(jnp.bfloat16))
            x = jax.random.normal(keys[-1], (rows, kk), jnp.bfloat16)
            per_group = sum(w.nbytes for w in ws + ss) // g_count
            nbytes = per_group * rows            # every row reads its own group (one layer's weight at rows 1)
            ref = None
            for v in variants or SHAPE_VARIANTS:
                # the projections' own tile overrides under the variant: "default" is what the model runs
                w_nk = v.get("w_nk", False)   # a storage order, not a tile: the weights are transposed
                proj = projection_tiles(fp8, layout, w_nk) if name in ("qkv", "o_proj") else {}
                cfg = {**proj, **base, **{a: b for a, b in v.items() if a != "w_nk"}}
                t = gemv_tiles(kk, widths if len(widths) > 1 and not pair else widths[0], rows, fp8, layout, 128,
                               w_nk=w_nk, **cfg)   # over GEMV_DEFAULTS, GEMV_LAYOUT_DEFAULTS, GEMV_NK_DEFAULTS
                if t is None:
                    continue

                ws_v = [jnp.swapaxes(w, 1, 2) for w in ws] if w_nk else ws

                @jax.jit
                def run(x, ws, ss, t=tuple(sorted(t.items()))):
                    tt = dict(t)

                    def body(i, acc):
                        groups = (i * stride + jnp.arange(rows, dtype=jnp.int32)) if rows > 1 else jnp.reshape(i, (1,))
                        outs = gemv(x, rows, groups, ws, ss if fp8 else None, row_div=1, layout=layout,
                                    block=128, concat=len(ws) > 1 and not pair, **tt)   # as the model calls it
                        return acc + sum(o[0, 0, 0] for o in outs)   # keeps the kernels alive; not timed
                    return jax.lax.fori_loop(0, layers, body, jnp.float32(0))

                @jax.jit
                def first(x, ws, ss, t=tuple(sorted(t.items()))):
                    outs = gemv(x, rows, jnp.arange(rows, dtype=jnp.int32), ws, ss if fp8 else None, row_div=1,
                                layout=layout, block=128, concat=len(ws) > 1 and not pair, **dict(t))
                    return jnp.concatenate([o.sum(0) for o in outs], axis=1)
                try:
                    got = np.asarray(first(x, ws_v, ss), np.float64)
                    tm, launch = _gemv_device_seconds(lambda: run(x, ws_v, ss))
                    tm /= layers
                except Exception as exc:
                    log(f"  {kind} {name} {_fmt(v)}: FAILED {type(exc).__name__}: {str(exc)[:160]}")
                    continue
                if ref is None:
                    ref = got
                err = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
                floor = nbytes / bandwidth
                row = dict(kind=kind, shape=name, variant=_fmt(v), cfg=cfg, tiles=t, us=tm * 1e6,
                           floor_us=floor * 1e6, pct_floor=100 * floor / tm, rel_err=err, launch=launch)
                out.append(row)
                log(f"  {kind:5s} {name:11s} {_fmt(v):34s} {tm * 1e6:7.2f} us  floor {floor * 1e6:6.2f} us  "
                    f"{row['pct_floor']:5.1f}%  err {err:.1e}  split {t['split_k']}  {launch}")
    return out


def _gemv_device_seconds(call) -> tuple[float, str]:
    """Device time of the gemv kernels in one call (the profiler's, not wall time: a timed
    fori_loop of small kernels measures the loop's overhead; run 11 in benchmarks/NOTES.md), and
    the gemv kernel's launch details (registers per thread, shared memory, occupancy), which say
    how many programs an SM holds at once."""
    tl = device_timeline(call)
    if tl is None:
        raise RuntimeError("no profile written (is this a GPU?)")
    names = [n for n in tl["by_name"] if n.startswith("qwen3_gemv")]
    return (sum(tl["by_name"][n][1] for n in names) / 1e9,
            " | ".join(tl["details"][n] for n in names if tl["details"][n]))


def _w8a8(kind: str, cfg) -> bool:
    """Whether gemv settings `cfg` (an override of GEMV_DEFAULTS[kind]) quantize activations."""
    return {**gemv_mod.GEMV_DEFAULTS[kind], **(cfg or {})}.get("convert") == "e4m3"


def _fmt(v: dict) -> str:
    return ",".join(f"{k}={x}" for k, x in v.items()) or "default"
