"""The decode MoE expert FFN in one kernel: per (assignment, F slice) program, gate/up over all of
D, the swiglu, and that slice's share of the down projection.

Why: at batch 1 the two-kernel gemv path (gate/up, then down) runs the FP8 GEMVs at 50-65% of
their floor, and each kernel pays its own ramp. Splitting the FFN's inner dimension F across
programs needs no communication between them: program (r, j) computes h = silu(x Wg) * (x Wu)
for columns j*bf.. of F, with no split of D, and multiplies that h slice by the same rows of the
down weight, giving a partial of the output over F slices. The partials [F/bf, A, D] are summed
where the weighted sum over experts runs (an XLA fusion, as the split-K partials were).

Shapes (G groups, D model width, F expert width, A = M * k assignments):
  x [M, D] or a gemv_inputs source (the post-attention RMSNorm in the x load); row r reads x
    row r // k,
  groups [A] int32 in [-1, G) (-1: a zero partial, no weight read),
  gate, up [G, D, F] (or [G, F, D] with w_nk: the checkpoint's [out, in]), down [G, F, D],
  scales None, or (gate, up) [G, ceil(D/block), F] and down [G, F, ceil(D/block)] float32,
  -> float32 partials [F/bf, A, D].

Numerics are the two-kernel path's: float32 accumulation, h rounded to x's dtype before the down
MMA; FP8 through the f16 MMA (gemv's convert="f16", with its power-of-two pre-scale for the down
projection's per-row scale). Tensor cores on 16-row tiles whose row 0 is the vector (gemv's
"dot" mode).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from . import interpret as _interpret
from .gemv import _RowMap, _program
from .gemv_inputs import as_source

# Tiles (benchmarks/NOTES.md run 23 has the sweep): bf = F columns per program (the down
# projection's K), bk = D per gate/up step, bn = D per down step.
MOE_GEMV_DEFAULTS = dict(bf=32, bk=128, bn=128, num_warps=4, num_stages=2)


def moe_gemv_tiles(d: int, f: int, fp8: bool, block: int, **override):
    """moe_gemv keyword arguments for these shapes, or None where the tiles divide nothing."""
    cfg = {**MOE_GEMV_DEFAULTS, **override}
    bf, bk, bn = cfg["bf"], cfg["bk"], cfg["bn"]
    if f % bf or d % bk or d % bn or bf < 16:
        return None
    if fp8 and (block % bk or block % bn):
        return None
    return cfg


def moe_gemv(x_md, groups_a, gate, up, down, scales=None, *, k: int, block=128, w_nk=False, interpret=None,
             **tiles):
    """See the module doc. k: assignments per token (row r reads x row r // k)."""
    x_md = as_source(x_md)
    if not x_md.covered(tiles.get("bk", MOE_GEMV_DEFAULTS["bk"])):
        x_md = as_source(x_md.materialize())
    return _moe_gemv(x_md, groups_a, gate, up, down, tuple(scales) if scales else (), k=k, block=block,
                     w_nk=w_nk, interpret=interpret, **{**MOE_GEMV_DEFAULTS, **tiles})


@functools.partial(jax.jit, static_argnames=("k", "block", "w_nk", "bf", "bk", "bn", "num_warps", "num_stages",
                                             "interpret"))
def _moe_gemv(x_md, groups_a, gate, up, down, scales, *, k, block, w_nk, bf, bk, bn, num_warps, num_stages,
              interpret):
    g_count, f_dim, d_dim = down.shape
    gu_shape = (g_count, f_dim, d_dim) if w_nk else (g_count, d_dim, f_dim)
    if gate.shape != gu_shape or up.shape != gu_shape:
        raise ValueError(f"gate/up {gate.shape}, {up.shape} do not match down {down.shape} "
                         f"(expected {gu_shape}{' with w_nk' if w_nk else ''})")
    if x_md.k_dim != d_dim:
        raise ValueError(f"x has D={x_md.k_dim} but the experts have D={d_dim}")
    if f_dim % bf or d_dim % bk or d_dim % bn:
        raise ValueError(f"tiles bf={bf}, bk={bk}, bn={bn} do not divide F={f_dim}, D={d_dim}; "
                         "use moe_gemv_tiles")
    fp8 = len(scales) > 0
    if fp8 and (block % bk or block % bn):
        raise ValueError(f"FP8 tiles bk={bk}, bn={bn} must divide the scale block {block}")
    a_count = groups_a.shape[0]
    rows = _RowMap(None, a_count, k)
    program = functools.partial(_program, rows_r=rows, per_row=True, nx=len(x_md.operands()), nw=3,
                                ns=len(scales))
    cdt = jnp.float16 if fp8 else (x_md.dtype if x_md.dtype in (jnp.bfloat16, jnp.float16) else jnp.bfloat16)
    # f16 MMA for the down projection: x * per-row scale (~1e-4) would be an f16 subnormal; a
    # power-of-two pre-scale keeps it normal and is divided out of the float32 product exactly.
    pre = 1024.0 if fp8 else 1.0

    def kernel(*refs):
        x_refs, (g_ref, u_ref, d_ref), s_refs, (o_ref,), (r, j, _), grp, row = program(refs)
        f0 = pl.multiple_of(j * bf, bf)
        rows16 = jax.lax.broadcasted_iota(jnp.int32, (16, bk), 0) == 0
        rows16_f = jax.lax.broadcasted_iota(jnp.int32, (16, bf), 0) == 0

        @pl.when(grp >= 0)
        def _compute():
            state = x_md.prepare(x_refs, row)

            def gate_up_step(t, accs):
                k0 = pl.multiple_of(t * bk, bk)
                xk = x_md.load(x_refs, state, row, k0, bk)
                x16 = jnp.where(rows16, jnp.broadcast_to(xk[None, :], (16, bk)), 0.0).astype(cdt)
                out = []
                for i, (w_ref, acc) in enumerate(zip((g_ref, u_ref), accs)):
                    if w_nk:
                        w = w_ref[grp, pl.ds(f0, bf), pl.ds(k0, bk)].astype(cdt)
                        part = jax.lax.dot_general(x16, w, (((1,), (1,)), ((), ())),
                                                   preferred_element_type=jnp.float32)
                    else:
                        w = w_ref[grp, pl.ds(k0, bk), pl.ds(f0, bf)].astype(cdt)
                        part = jnp.dot(x16, w, preferred_element_type=jnp.float32)
                    if fp8:
                        part = part * s_refs[i][grp, k0 // block, pl.ds(f0, bf)][None, :]
                    out.append(acc + part)
                return tuple(out)

            zeros = jnp.zeros((16, bf), jnp.float32)
            acc_g, acc_u = jax.lax.fori_loop(0, d_dim // bk, gate_up_step, (zeros, zeros))
            gv, uv = jnp.sum(acc_g, axis=0), jnp.sum(acc_u, axis=0)     # x's padding rows are zeros
            h = (gv * jax.nn.sigmoid(gv) * uv).astype(x_md.dtype).astype(jnp.float32)   # [bf]

            def down_step(t, carry):
                n0 = pl.multiple_of(t * bn, bn)
                hs = h * (s_refs[2][grp, pl.ds(f0, bf), n0 // block] * pre) if fp8 else h
                h16 = jnp.where(rows16_f, jnp.broadcast_to(hs[None, :], (16, bf)), 0.0).astype(cdt)
                w = d_ref[grp, pl.ds(f0, bf), pl.ds(n0, bn)].astype(cdt)
                part = jnp.dot(h16, w, preferred_element_type=jnp.float32)
                o_ref[j, r, pl.ds(n0, bn)] = jnp.sum(part, axis=0) * (1.0 / pre) if fp8 else jnp.sum(part, axis=0)
                return carry

            jax.lax.fori_loop(0, d_dim // bn, down_step, 0)

        @pl.when(grp < 0)
        def _zeros():
            def zero_step(t, carry):
                o_ref[j, r, pl.ds(pl.multiple_of(t * bn, bn), bn)] = jnp.zeros((bn,), jnp.float32)
                return carry
            jax.lax.fori_loop(0, d_dim // bn, zero_step, 0)

    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((f_dim // bf, a_count, d_dim), jnp.float32),
        grid=(a_count, f_dim // bf, 1),
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=_interpret() if interpret is None else interpret,
        name="qwen3_moe_gemv_fp8" if fp8 else "qwen3_moe_gemv",
    )(groups_a.astype(jnp.int32), *x_md.operands(), gate, up, down, *scales)
