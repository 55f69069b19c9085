"""Element offsets wide enough for one-byte arrays of 2-4 GiB in Pallas Triton kernels.

Pallas' Triton lowering computes a ref's element offsets in int32 unless the array is larger
than 2**32 *bytes* (`_compute_offsets_from_indices`). The offsets are signed element counts, so
a one-byte array of more than 2**31 elements and at most 4 GiB was read at wrapped offsets with
no error: on an H200 with jax 0.11.2 a 3 GiB uint8 or e4m3 array read the wrong memory (run 86
in benchmarks/NOTES.md). FP8 weights land there: 30B-A3B's experts are 2.25 GiB per weight per
device at ep=4 or tp=4, 235B-A22B's attention and experts at ep=32.

`install()` wraps that function so an array in the gap gets int64 offsets, as every array over
4 GiB already does (30B-A3B's FP8 experts on one device, the path the FP8 benchmarks time).
Every other array lowers exactly as before. Where the wrap cannot be installed (a jax that lays
the lowering out differently) the kernels refuse such weights instead (kernels.index_overflows)
and the XLA path runs them.

WIDEN: True (the default) or False (Pallas as it is; read when a kernel is lowered: the GPU test
that shows the gap sets it).
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

WIDEN = True
_installed = False


def in_gap(shape, dtype) -> bool:
    """Pallas as it is would index this array with wrapping int32 offsets: one-byte elements,
    more than 2**31 of them, at most 2**32 bytes."""
    return jnp.dtype(dtype).itemsize == 1 and 2 ** 31 < math.prod(shape) <= 2 ** 32


def widened() -> bool:
    """True when kernels lowered now index gap-sized arrays with int64 offsets."""
    return _installed and WIDEN


def install() -> bool:
    """Wrap Pallas Triton's offset computation (once). False when this jax lays it out
    differently; gap-sized weights then stay on the XLA path."""
    global _installed
    try:
        from jax._src.pallas.triton import lowering
    except ImportError:
        return False
    base = getattr(lowering, "_compute_offsets_from_indices", None)
    block_info_type = getattr(lowering, "BlockInfo", None)
    if base is None or not dataclasses.is_dataclass(block_info_type) or \
            "full_shape_dtype" not in {f.name for f in dataclasses.fields(block_info_type)}:
        return False
    if getattr(base, "qwen3_wide_offsets", False):
        _installed = True
        return True

    def offsets(block_info, nd_indexer):
        full = block_info.full_shape_dtype
        if WIDEN and in_gap(full.shape, full.dtype):
            # The lowering reads the dtype only to size the array in bytes; a two-byte dtype of
            # the same shape is over 2**32 bytes, so it picks int64. The pointers keep the real
            # element type (they come from the ref, not from block_info).
            block_info = dataclasses.replace(block_info, full_shape_dtype=full.update(dtype=jnp.dtype(jnp.uint16)))
        return base(block_info, nd_indexer)

    offsets.qwen3_wide_offsets = True
    lowering._compute_offsets_from_indices = offsets
    _installed = True
    return True
