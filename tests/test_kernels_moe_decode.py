"""The MoE gemv path fed by the routing kernel (qwen3_jax/kernels/moe_ffn.py, router.py).

On one device the top-k kernel writes each assignment's stacked-expert group, so the gemv path
runs no XLA index arithmetic (iota, compare, select) between routing and the expert GEMVs; row
indices are constants. CPU: Pallas interpret mode against the path that derives the groups from
the expert ids, and the Triton lowering of a 30B-A3B layer (route + experts). GPU (marked): the
compiled layer against the derived-groups path; on the device machine:
`QWEN3_JAX_TEST_GPU=1 python3 -m pytest -m gpu tests/test_kernels_moe_decode.py`.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen3_jax.kernels.gemv import GEMV_DEFAULTS
from qwen3_jax.kernels.moe_ffn import ExpertArrays, moe_ffn, moe_ffn_in_place
from qwen3_jax.kernels.router import route_in_place

L30, E30, D30, F30, K30 = 48, 128, 2048, 768, 8       # Qwen3-30B-A3B: layers, experts, D, F, top-k


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def stacked_experts(seed, layers, e, d, f, fp8, block=64):
    """(gate, up, down, scales or None) stacked [L, E, ...] as the model holds them; jax.random
    (made on the device: the GPU test's 30B-shaped layers hold ~1.2 G values)."""
    keys = jax.random.split(jax.random.key(seed), 6)
    shapes = ((layers, e, d, f), (layers, e, d, f), (layers, e, f, d))
    if not fp8:
        return (*[(0.05 * jax.random.normal(kk, sh, jnp.float32)).astype(jnp.bfloat16)
                  for kk, sh in zip(keys, shapes)], None)
    mats = [jax.random.normal(kk, sh, jnp.float32).astype(jnp.float8_e4m3fn) for kk, sh in zip(keys, shapes)]
    scales = []
    for kk, sh, axis in zip(keys[3:], shapes, (2, 2, 3)):
        s_shape = list(sh)
        s_shape[axis] = -(-sh[axis] // block)
        scales.append(jax.random.uniform(kk, s_shape, jnp.float32, 0.01, 0.03))
    return (*mats, tuple(scales))


# -- CPU: interpret mode ------------------------------------------------------------------------

@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("n", [1, 3])
def test_routed_groups_equal_the_derived_groups(fp8, n):
    """Layer 2 of 3 stacked layers: the MoE fed route_in_place's groups equals the MoE deriving
    them from the expert ids, bit for bit; reading another layer is far off."""
    rng = np.random.default_rng(10 * n + fp8)
    layers, e, d, f, k = 3, 16, 128, 64, 4
    x = jnp.asarray(rng.standard_normal((n, d)), jnp.bfloat16)
    router = jnp.asarray(0.1 * rng.standard_normal((layers, d, e)), jnp.bfloat16)
    gate, up, down, scales = stacked_experts(n, layers, e, d, f, fp8)
    layer = jnp.int32(2)
    w, ex, groups = route_in_place(x, router, layer, k, True, with_groups=True, interpret=True)
    new = moe_ffn_in_place(x, w, ex, gate, up, down, scales, 64, layer, groups=groups)
    arrays = ExpertArrays.from_stacked(gate, up, down, scales, block=64, layer=layer)
    old = moe_ffn(x, w, ex, arrays)
    assert new.shape == (n, d) and new.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(new), np.asarray(old))
    arrays0 = ExpertArrays.from_stacked(gate, up, down, scales, block=64, layer=jnp.int32(0))
    assert rel(moe_ffn(x, w, ex, arrays0), old) > 0.3


def test_a_devices_share_of_experts_derives_its_groups():
    """The mesh case (experts 3..5 of 6 held here): assignments to experts held elsewhere
    contribute nothing, against the reference expert FFN; precomputed groups are refused."""
    from qwen3_jax.moe import expert_ffn

    rng = np.random.default_rng(4)
    n, e_local, d, f, k = 3, 3, 128, 64, 2
    x = jnp.asarray(rng.standard_normal((n, d)), jnp.bfloat16)
    experts = jnp.asarray([[0, 4], [5, 3], [1, 2]], jnp.int32)          # row 2: nothing held here
    w = jnp.asarray(rng.uniform(0.2, 0.8, (n, k)), jnp.float32)
    mats = [jnp.asarray(rng.standard_normal(s) * 0.05, jnp.bfloat16) for s in ((e_local, d, f), (e_local, d, f),
                                                                             (e_local, f, d))]
    got = moe_ffn(x, w, experts, ExpertArrays(*mats, num_experts=e_local), 3, strategy="gemv")
    want = expert_ffn(x, w, experts, *mats, first_expert=3)
    assert rel(got, want) < 1e-2 and np.all(np.asarray(got[2]) == 0.0)
    with pytest.raises(ValueError, match="first_expert=3"):
        moe_ffn(x, w, experts, ExpertArrays(*mats, num_experts=e_local), 3, groups=experts.reshape(-1))


# -- CPU: Triton lowering of a 30B-A3B layer (no GPU needed, nothing allocated) ----------------

def _layer_fn(fp8, groups=True):
    """route + expert FFN of one 30B-A3B layer read in place from the stacked params."""
    def fn(x, router, layer, gate, up, down, *scales):
        routed = route_in_place(x, router, layer, K30, True, with_groups=groups, interpret=False)
        w, ex, grp = routed if groups else (*routed, None)
        arrays = ExpertArrays.from_stacked(gate, up, down, scales if fp8 else None, layer=layer)
        return moe_ffn(x, w, ex, arrays, groups=grp, interpret=False)
    return fn


def _layer_shapes(n, fp8):
    sds = jax.ShapeDtypeStruct
    wd = jnp.float8_e4m3fn if fp8 else jnp.bfloat16
    args = [sds((n, D30), jnp.bfloat16), sds((L30, D30, E30), jnp.bfloat16), sds((), jnp.int32),
            sds((L30, E30, D30, F30), wd), sds((L30, E30, D30, F30), wd), sds((L30, E30, F30, D30), wd)]
    if fp8:
        ks, ns = sds((L30, E30, D30 // 128, F30), jnp.float32), sds((L30, E30, F30, D30 // 128), jnp.float32)
        args += [ks, ks, ns]
    return args


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("n", [1, 8])
def test_30b_layer_lowers_to_four_kernels_and_no_index_arithmetic(fp8, n):
    ops_of = {}
    for groups in (True, False):
        text = jax.jit(_layer_fn(fp8, groups)).trace(*_layer_shapes(n, fp8)).lower(
            lowering_platforms=("cuda",)).as_text()
        ops_of[groups] = set(re.findall(r"(stablehlo\.[a-z_]+)", text))
        if groups:
            names = re.findall(r'name = "(qwen3_[a-z0-9_]+)"', text)
    mode = GEMV_DEFAULTS["fp8" if fp8 else "bf16"]["mode"]   # the kernel's name follows the gemv mode
    gemv = "qwen3_gemv" + ("_dot" if mode == "dot" else "") + ("_fp8" if fp8 else "")
    assert names == ["qwen3_gemv_dot", "qwen3_router_topk", gemv, gemv]
    index_ops = {"stablehlo.iota", "stablehlo.compare", "stablehlo.select"}
    assert not ops_of[True] & index_ops, ops_of[True] & index_ops
    assert ops_of[False] & index_ops          # the derived-groups path has them: the check bites


# -- GPU: compiled against the derived-groups path ----------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("n", [1, 8])
def test_gpu_routed_groups_match_the_derived_groups_at_30b_shapes(fp8, n):
    """2 stacked layers of 30B-A3B shapes (layer 1 read in place), N tokens of top-8 routing."""
    rng = np.random.default_rng(n + 2 * fp8)
    x = jnp.asarray(rng.standard_normal((n, D30)), jnp.bfloat16)
    router = jnp.asarray(0.02 * rng.standard_normal((2, D30, E30)), jnp.bfloat16)
    gate, up, down, scales = stacked_experts(n, 2, E30, D30, F30, fp8, block=128)
    sc = scales or ()
    layer = jnp.int32(1)
    new = jax.jit(_layer_fn(fp8))(x, router, layer, gate, up, down, *sc)
    old = jax.jit(_layer_fn(fp8, groups=False))(x, router, layer, gate, up, down, *sc)
    # Same groups -> same experts and the same kernels; the two XLA programs around them may
    # order a float32 sum differently (1 ulp on an H100 at n=8, run 12); a wrong group is O(1).
    np.testing.assert_allclose(np.asarray(new), np.asarray(old), rtol=1e-5, atol=1e-5)
