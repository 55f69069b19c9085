"""Pallas (Triton back end) kernels for the decode/prefill hot path on NVIDIA GPUs.

Why they exist (measured on an H100, ../shared/GPU_NOTES.md): XLA's `ragged_dot` reads every
expert even when a decode step routes to 8 of 128, and XLA materializes a block-FP8 weight in
bf16 before the dot, so FP8 runs slower than bf16. The kernels here read only the experts a
step routes to, read every weight where it lies in the stacked [L, ...] params (a per-layer
slice handed to a custom call would be copied first), and fuse the FP8 block dequantize.

Files: gemv.py (one output row per program: decode), gemv_inputs.py (what a gemv can finish in
its x load: a norm, the swiglu), grouped_matmul.py (row blocks of one
group each, tensor cores: prefill and large decode batches), moe_blocks.py (routing -> row
blocks: a counting sort in two kernels, or XLA's argsort), moe_ffn.py (the MoE expert FFN on either kernel), linear.py (projections read in
place, FP8 fused), prefill_attention.py (cuDNN fused attention for prompts from position 0; a chunk
continuing a cached prompt as two cuDNN calls, cached keys read in place through a page table and
its own keys, merged by their log-sum-exps; a Pallas kernel for it where cuDNN does not run),
decode_attention.py (one new token per row against the KV cache, read in place, the key
splits merged by the last program; with the step's prologue in the same kernel where it
covers the shapes), dequantize.py (FP8 [out, in] -> a transposed bf16 copy for
prefill), fp8_dot.py (how an e4m3 x e4m3 dot accumulates on the tensor cores),
index_width.py (int64 offsets for one-byte arrays of 2-4 GiB, which Pallas indexes wrongly),
qk_prologue.py (decode: q/k norm + RoPE + q padding in one kernel, where the attention
kernel does not take them itself),
router.py (MoE routing at decode: router logits read in place by a gemv, or from 17 rows a
split-K grouped matmul; softmax + top-k fused),
sharded.py (the same kernels per device under shard_map on a mesh), tune.py (microbenchmarks
and the tile sweep).

The switch: `QWEN3_JAX_KERNELS` = auto (default: on when JAX's default backend is a GPU),
1/on, 0/off; `set_enabled(True/False/None)` overrides it in-process (read at trace time, so set
it before the first call of a jitted function). jax 0.11 deprecates Pallas' Triton back end, which
every kernel here is written for: on a jax without it the package still imports, auto means off
(with a warning on a GPU), and asking for the kernels is an error that says so (TRITON_MISSING). The plain-XLA path stays the reference. Kernels
run only for a bf16/f16 compute dtype (float32 models keep XLA's numerics). On one device the
model calls them directly; on a mesh it runs them per device inside shard_map on each device's
shards (sharded.py), since a pallas_call under automatic SPMD partitioning would be replicated.
On a mesh the routing kernels (router.py) run per device on the MoE's gathered tokens
(moe.GatheredRouting) and decode attention takes its prologue inside per device where a device
holds 16 query heads or more; the separate q/k prologue (qk_prologue.py) runs on one device
only. Forced on
without a GPU they run in Pallas interpret mode: slow, for tests of the logic.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os

import jax
import jax.numpy as jnp

from . import index_width  # no Pallas import of its own; install() (below) needs Triton

_override: bool | None = None
KERNEL_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_log = logging.getLogger(__name__)


def _probe_triton() -> str | None:
    """None when Pallas' Triton back end imports, else why not (it is deprecated from jax 0.11)."""
    try:
        from jax.experimental.pallas import triton  # noqa: F401
    except ImportError as err:
        return f"{type(err).__name__}: {err}"
    return None


TRITON_MISSING = _probe_triton()
_warned_missing = False


def _env_setting() -> bool | None:
    v = os.environ.get("QWEN3_JAX_KERNELS", "auto").strip().lower()
    if v in ("", "auto"):
        return None
    if v in ("1", "on", "true", "yes"):
        return True
    if v in ("0", "off", "false", "no"):
        return False
    raise ValueError(f"QWEN3_JAX_KERNELS={v!r} is not understood; use auto, on or off")


def on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def enabled() -> bool:
    """Kernels requested (override, else env, else: on for GPU, off elsewhere). Without Pallas
    Triton: False for auto, a RuntimeError when they were asked for."""
    global _warned_missing
    asked = _override if _override is not None else _env_setting()
    if TRITON_MISSING is not None and asked is not False:
        if asked:
            raise RuntimeError(
                f"the Pallas kernels were asked for (QWEN3_JAX_KERNELS=on or kernels.set_enabled(True)), but "
                f"jax {jax.__version__} has no Pallas Triton back end ({TRITON_MISSING}). Install a jax that has "
                "it (0.10 and 0.11 do), or run without the kernels: QWEN3_JAX_KERNELS=off")
        if on_gpu() and not _warned_missing:
            _warned_missing = True
            _log.warning("Pallas kernels off: jax %s has no Pallas Triton back end (%s); decode and prefill "
                         "run on the plain-XLA path, several times slower", jax.__version__, TRITON_MISSING)
        return False
    return on_gpu() if asked is None else asked


def describe() -> str:
    """One start-up line: whether the Pallas kernels run, and why not when they do not."""
    try:
        on = enabled()
    except (ValueError, RuntimeError) as err:
        return f"kernels: not usable ({err})"
    if on:
        from .prefill_attention import CHUNK_SPLIT_PROGRAMS, SPLIT_MIN_TOKENS
        how = "Pallas Triton" if on_gpu() else "Pallas interpret mode, no GPU: slow"
        chunks = "the chunk kernel" + (f" (keys split up to {CHUNK_SPLIT_PROGRAMS} programs)" if CHUNK_SPLIT_PROGRAMS
                                       else "")
        if on_gpu() and SPLIT_MIN_TOKENS is not None:
            chunks = f"{chunks} below {SPLIT_MIN_TOKENS} tokens, the cuDNN split from there"
        return (f"kernels: on ({how}; FP8 GEMV {fp8_gemm()}, FP8 matmul {fp8_matmul()}; prefill chunks over the "
                f"cache: {chunks}; bf16/f16 compute only)")
    if TRITON_MISSING is not None:
        why = f"jax {jax.__version__} has no Pallas Triton back end"
    elif _override is False or _env_setting() is False:
        why = "switched off: QWEN3_JAX_KERNELS=off or kernels.set_enabled(False)"
    else:
        why = f"no GPU, {jax.default_backend()}"
    return f"kernels: off ({why}; the plain-XLA path)"


def set_enabled(value: bool | None) -> None:
    """Force kernels on/off for this process (None: back to QWEN3_JAX_KERNELS / auto)."""
    global _override
    _override = value


@contextlib.contextmanager
def kernels_enabled(value: bool | None):
    """`with kernels_enabled(False): ...` traces with the plain-XLA path."""
    global _override
    old, _override = _override, value
    try:
        yield
    finally:
        _override = old


def interpret() -> bool:
    """Pallas interpret mode whenever there is no GPU to compile for."""
    return not on_gpu()


def usable(dtype) -> bool:
    """Kernels enabled and `dtype` a compute dtype they cover (bf16/f16)."""
    return enabled() and jnp.dtype(dtype) in KERNEL_DTYPES


def single_device(ctx) -> bool:
    return ctx is None or ctx.spec.num_devices == 1


def active(ctx, dtype) -> bool:
    """Use kernels directly (no shard_map): usable and a single device."""
    return usable(dtype) and single_device(ctx)


# FP8 weight GEMVs (decode: projections up to linear.GEMV_MAX_ROWS rows, MoE up to GEMV_MAX_ASSIGNMENTS):
# w8a16 keeps bf16 activations (rounded to float16 for an f16 MMA); w8a8 quantizes them to e4m3 per
# bk-wide group, dynamically, as the checkpoints' `activation_scheme: dynamic` says and FP8 serving
# engines run them (gemv.py's module doc has the numerics); auto (the default) is w8a8 for the
# layout-"k" gemvs (MoE gate/up, q/k/v) of at least gemv.W8A8_MIN_ROWS rows, where the e4m3 MMA
# needs no weight conversion and was measured faster, and w8a16 elsewhere. The grouped matmuls
# (prefill, large batches) have their own setting, grouped_matmul.MATMUL_DEFAULTS["convert"].
FP8_GEMM = {"w8a16": "f16", "w8a8": "e4m3", "auto": "auto"}
# FP8 weights multiplied by at least this many rows per weight are dequantized to bf16 by XLA and
# multiplied on the bf16 path; 0 = never. Projections: a bf16 copy + cuBLAS beats the W8A8 kernel
# from 1k rows (run 56, H200: 1k prefill 30.83 ms with copies against 31.46 with W8A8
# projections; 8k 203.1 against 214.0). Run 29 (H100) set 512 for the W8A16 kernel of then.
# Run 163 (H200) again: copies 29.29 / 47.29 / 166.20 ms at 1k / 2k / 8k against W8A8
# projections 30.97 / 53.03 / 202.65.
FP8_DEQUANTIZE_MIN_ROWS = 512
# The MoE (an MoE layer's assignments per expert held, which on a mesh counts every token's
# assignments: an upper bound). The W8A8 grouped matmul beat the layer's bf16 copy at every size
# measured (H200, benchmarks/NOTES.md): 64 and 512 rows per expert in one layer (run 55: 8k
# prompt 2521 against 2718 us), and the model's 16k prefill, 1024 rows (run 57: 443.3 against
# 453.8 ms). So never by default; the relative gap narrows with the rows (5.7% at 8k, 2.3% at 16k),
# and 32k did not fit the benchmark (run 58).
FP8_DEQUANTIZE_MOE_MIN_ROWS = 0


def fp8_dequantized(rows_per_weight: int, moe: bool = False) -> bool:
    """True when FP8 weights multiplied by this many rows each take the bf16 copy (read at trace
    time, see FP8_DEQUANTIZE_MIN_ROWS and FP8_DEQUANTIZE_MOE_MIN_ROWS)."""
    limit = FP8_DEQUANTIZE_MOE_MIN_ROWS if moe else FP8_DEQUANTIZE_MIN_ROWS
    return 0 < limit <= rows_per_weight


def fp8_matmul() -> str:
    """The FP8 grouped matmuls' numerics in force (prefill, large batches): 'w8a8' (e4m3
    activations, the default) or 'w8a16' (with the MMA dtype)."""
    from .grouped_matmul import MATMUL_DEFAULTS
    converts = sorted({cfg["convert"] for cfg in MATMUL_DEFAULTS.values()})
    return "/".join("w8a8" if c == "e4m3" else f"w8a16 ({c})" for c in converts)


def set_fp8_gemm(kind: str) -> None:
    """Choose the FP8 GEMV numerics for this process (read at trace time): 'auto', 'w8a8' or 'w8a16'."""
    from .gemv import GEMV_DEFAULTS
    if kind not in FP8_GEMM:
        raise ValueError(f"unknown FP8 GEMM kind {kind!r}; use one of {sorted(FP8_GEMM)}")
    GEMV_DEFAULTS["fp8"].update(convert=FP8_GEMM[kind], mode="dot")


def fp8_gemm() -> str:
    """The FP8 GEMV numerics in force: 'auto', 'w8a8', 'w8a16', or the raw gemv convert setting."""
    from .gemv import GEMV_DEFAULTS
    convert = GEMV_DEFAULTS["fp8"]["convert"]
    return {v: k for k, v in FP8_GEMM.items()}.get(convert, f"w8a16 (convert={convert})")


# Producer outputs the decode step finishes in the next gemv's x load (gemv_inputs.py), read at
# trace time. Measured at 30B-A3B shapes (benchmarks/NOTES.md, runs 16-17):
#   "norm": the two RMSNorms into the q/k/v, router and MoE gate/up gemvs. Removes 4 XLA kernels
#     per layer for ~1.3 us more gemv time: H200 batch 1 bf16 -0.085 ms, FP8 -0.10 ms per step.
#   "swiglu": into the MoE down gemv, where gate/up ran unsplit (moe_ffn.py): H200 batch 8 bf16
#     -0.29 ms. With split partials it cost more (FP8 batch 1 +0.19 ms), so it is skipped there.
# Decode attention's key-split merge was measured slower in o_proj's x load in both forms tried
# (runs 16 and 24); it runs in the attention kernel itself (decode_attention.COMBINE, run 40).
X_LOADS_ALL = ("norm", "swiglu")
X_LOADS = {"norm", "swiglu"}


def set_x_loads(names) -> None:
    """Choose which of X_LOADS_ALL the decode step fuses into gemv x loads (read at trace time)."""
    names = set(names)
    if not names <= set(X_LOADS_ALL):
        raise ValueError(f"unknown x loads {sorted(names - set(X_LOADS_ALL))}; choose from {X_LOADS_ALL}")
    X_LOADS.clear()
    X_LOADS.update(names)


def x_load(name: str) -> bool:
    """True when the decode step finishes `name` (one of X_LOADS_ALL) in a gemv's x load."""
    return name in X_LOADS


def index_overflows(*arrays) -> bool:
    """True when a kernel must not take one of `arrays` (None entries skipped): a one-byte array
    of more than 2**31 elements and at most 4 GiB, which Pallas' Triton lowering indexes with
    wrapping int32 offsets (read wrong, silently: run 86 in benchmarks/NOTES.md), and this jax
    could not be given wider ones (index_width.install). The kernel entries then return None and
    the XLA path runs (slower, right); the first time per shape it is logged with a way out.
    30B-A3B's FP8 experts are 2.4 GB per weight at ep=4 or tp=4."""
    if index_width.widened():
        return False
    for a in arrays:
        if a is not None and index_width.in_gap(a.shape, a.dtype):
            size = math.prod(a.shape)
            key = (tuple(a.shape), str(a.dtype))
            if key not in _overflow_logged:
                _overflow_logged.add(key)
                _log.warning("kernels: a %s array of %.2f GiB %s lies in Pallas Triton's int32-offset gap "
                             "(2-4 GiB of one-byte elements per device) and this jax's lowering could not be "
                             "widened: its layers run on the XLA path, slower. A mesh that shards it to under "
                             "2 GiB or over 4 GiB per device avoids this (e.g. another ep or tp size).",
                             a.dtype, size / 2 ** 30, tuple(a.shape))
            return True
    return False


_overflow_logged: set = set()


def pick_tile(dim: int, target: int, minimum: int = 16) -> int | None:
    """Largest power of two <= target that divides dim and is >= minimum (Triton blocks are
    powers of two), or None when there is none (the caller falls back to XLA)."""
    t = 1 << max(int(target).bit_length() - 1, 0)
    while t >= minimum:
        if dim % t == 0:
            return t
        t //= 2
    return None


# The kernels import Pallas Triton; without it (TRITON_MISSING) enabled() is never True, so the
# model never reaches these names.
if TRITON_MISSING is None:
    from . import fp8_dot  # noqa: E402
    fp8_dot.install()   # e4m3 dots keep their MMAs in flight (fp8_dot.py)
    index_width.install()   # FP8 weights of 2-4 GiB get int64 offsets (index_width.py)
    from .linear import linear_einsum, projections_partials  # noqa: E402
    from .prefill_attention import causal_prefill_attention, chunk_attention_cached, chunk_covered  # noqa: E402
    from .decode_attention import covered as decode_attention_covered, decode_attention_cached  # noqa: E402
    from .moe_ffn import ExpertArrays, moe_ffn_in_place, moe_ffn_stacked  # noqa: E402
    from .router import route_in_place  # noqa: E402
    from . import qk_prologue, sharded  # noqa: E402

__all__ = ["enabled", "describe", "TRITON_MISSING", "set_enabled", "kernels_enabled", "active", "usable", "single_device", "interpret",
           "pick_tile", "FP8_GEMM", "set_fp8_gemm", "fp8_gemm", "fp8_matmul", "fp8_dequantized", "FP8_DEQUANTIZE_MIN_ROWS", "FP8_DEQUANTIZE_MOE_MIN_ROWS", "X_LOADS_ALL", "set_x_loads", "x_load",
           "linear_einsum", "projections_partials",
           "causal_prefill_attention", "chunk_attention_cached", "chunk_covered", "decode_attention_cached", "decode_attention_covered", "moe_ffn_stacked",
           "moe_ffn_in_place", "ExpertArrays", "route_in_place",
           "qk_prologue", "sharded"]
