"""How the tensor cores accumulate an e4m3 x e4m3 dot in a Pallas Triton kernel.

Pallas lowers `dot_general` to Triton's `tt.dot` without its `maxNumImpreciseAcc` attribute,
whose default, 0, tells Triton's Hopper lowering that no product may stay in the FP8 MMA's own
accumulator: after every 32-deep wgmma instruction it waits for the result and adds it into a
separate float32 accumulator, so the MMAs of one dot never overlap. (Triton's own `tl.dot` sets
no such limit for FP8 unless asked.) Every FP8 x FP8 dot here is one K step of at most 128
products whose result the kernel scales and adds into float32 itself, the promotion interval
DeepGEMM uses; so the tensor core may keep a whole dot. `install()` wraps the lowering rule to
say so on dots whose operands are both 8-bit floats; bf16/f16 dots are untouched.

ACCUMULATE: "mma" (the above, the default) or "f32" (Triton's default, for A/B timing: read when
a kernel is lowered, so set it before the first call of a jitted function).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

ACCUMULATE = "mma"
ACCUMULATE_CHOICES = ("mma", "f32")
UNLIMITED = 1 << 30   # products per dot the MMA may accumulate before a float32 promotion


def _fp8(aval) -> bool:
    dt = jnp.dtype(aval.dtype)
    return dt.itemsize == 1 and jnp.issubdtype(dt, jnp.floating)


def install() -> bool:
    """Wrap Pallas Triton's dot_general lowering rule (once). False when this jax lays it out
    differently; FP8 dots then lower as Pallas does (correct, slower)."""
    try:
        from jax._src.lib.mlir import ir
        from jax._src.pallas.triton import lowering
    except ImportError:
        return False
    rules = getattr(lowering, "triton_lowering_rules", None)
    base = rules.get(jax.lax.dot_general_p) if isinstance(rules, dict) else None
    if base is None:
        return False
    if getattr(base, "qwen3_fp8_accumulate", False):
        return True

    def rule(ctx, a, b, **params):
        out = base(ctx, a, b, **params)
        if ACCUMULATE == "mma" and all(_fp8(av) for av in ctx.avals_in):
            op = getattr(out.owner, "operation", out.owner)
            if op.name == "tt.dot":   # a float32 result is the dot's own (no cast after it)
                op.attributes["maxNumImpreciseAcc"] = ir.IntegerAttr.get(ir.IntegerType.get_signless(32), UNLIMITED)
        return out

    rule.qwen3_fp8_accumulate = True
    rules[jax.lax.dot_general_p] = rule
    return True
