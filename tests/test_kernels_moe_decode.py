"""The MoE gemv path without XLA kernels between its GEMVs (qwen3_jax/kernels/moe_ffn.py).

New against old: groups precomputed by the routing kernel instead of derived in XLA, the
swiglu and the weighted combine as Pallas kernels instead of XLA fusions (epilogue="pallas" vs
"xla"). CPU: Pallas interpret mode on small shapes, and the Triton lowering of a 30B-A3B layer
(route + experts) checked to hold the six kernels and nothing XLA would launch a kernel for.
GPU (marked): the compiled kernels against the previous path at 30B shapes, and the compiled
HLO of one layer free of XLA fusions; on the device machine:
`QWEN3_JAX_TEST_GPU=1 python3 -m pytest -m gpu tests/test_kernels_moe_decode.py`.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen3_jax.kernels.gemv import GEMV_DEFAULTS

from qwen3_jax.kernels.moe_ffn import (ExpertArrays, combine_partials, moe_ffn, moe_ffn_in_place,
                                       swiglu_from_partials)
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

@pytest.mark.parametrize("s,f", [(1, 48), (3, 512)])     # F = 48: tile 16; 512: two tiles of 256
def test_swiglu_from_partials_is_the_xla_expression(s, f):
    rng = np.random.default_rng(s)
    g = jnp.asarray(rng.standard_normal((s, 5, f)) * 2, jnp.float32)
    u = jnp.asarray(rng.standard_normal((s, 5, f)), jnp.float32)
    got = swiglu_from_partials(g, u, dtype=jnp.bfloat16, interpret=True)
    want = (jax.nn.silu(jnp.sum(g, axis=0)) * jnp.sum(u, axis=0)).astype(jnp.bfloat16)
    assert got.dtype == jnp.bfloat16 and got.shape == (5, f)
    got32, want32 = np.asarray(got, np.float32), np.asarray(want, np.float32)
    # float32 sums in another order may move a value across a bf16 rounding boundary: 1 ulp at most
    np.testing.assert_allclose(got32, want32, rtol=2.0 ** -7, atol=1e-30)
    assert (got32 == want32).mean() > 0.98


@pytest.mark.parametrize("s,n,k", [(1, 1, 8), (2, 3, 4)])
def test_combine_partials_weights_and_sums_over_k(s, n, k):
    rng = np.random.default_rng(n)
    y = jnp.asarray(rng.standard_normal((s, n * k, 64)), jnp.float32)
    w = jnp.asarray(rng.uniform(0.0, 1.0, (n, k)), jnp.float32)
    got = combine_partials(y, w, interpret=True)
    want = jnp.sum((jnp.sum(y, axis=0) * w.reshape(-1)[:, None]).reshape(n, k, 64), axis=1)
    assert got.dtype == jnp.float32 and got.shape == (n, 64)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="partial rows"):
        combine_partials(y, w[:, :-1], interpret=True)


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("n", [1, 3])
def test_routed_groups_and_fused_epilogue_match_the_previous_path(fp8, n):
    """Layer 2 of 3 stacked layers: route_in_place's groups + the Pallas epilogue against the
    previous path (groups derived from experts in XLA, XLA epilogue)."""
    rng = np.random.default_rng(10 * n + fp8)
    layers, e, d, f, k = 3, 16, 128, 64, 4
    x = jnp.asarray(rng.standard_normal((n, d)), jnp.bfloat16)
    router = jnp.asarray(0.1 * rng.standard_normal((layers, d, e)), jnp.bfloat16)
    gate, up, down, scales = stacked_experts(n, layers, e, d, f, fp8)
    layer = jnp.int32(2)
    w, ex, groups = route_in_place(x, router, layer, k, True, with_groups=True, interpret=True)
    new = moe_ffn_in_place(x, w, ex, gate, up, down, scales, 64, layer, groups=groups)
    arrays = ExpertArrays.from_stacked(gate, up, down, scales, block=64, layer=layer)
    old = moe_ffn(x, w, ex, arrays, epilogue="xla")
    same_groups = moe_ffn(x, w, ex, arrays, groups=groups, epilogue="xla")
    np.testing.assert_array_equal(np.asarray(same_groups), np.asarray(old))    # the groups are the same
    # The epilogue's float32 sums run in another order; the bf16 hidden activation may round
    # the other way in a few elements, so agreement is to bf16 precision, not bitwise.
    assert new.shape == (n, d) and new.dtype == jnp.float32 and rel(new, old) < 2e-3
    # ...and a wrong layer would be far off.
    arrays0 = ExpertArrays.from_stacked(gate, up, down, scales, block=64, layer=jnp.int32(0))
    assert rel(moe_ffn(x, w, ex, arrays0, epilogue="xla"), old) > 0.3


def test_fused_epilogue_on_a_devices_share_of_experts():
    """The mesh case (experts 3..5 of 6 held here, groups derived in XLA) takes the Pallas
    epilogue too; assignments to experts held elsewhere contribute nothing."""
    rng = np.random.default_rng(4)
    n, e_local, d, f, k = 3, 3, 128, 64, 2
    x = jnp.asarray(rng.standard_normal((n, d)), jnp.bfloat16)
    experts = jnp.asarray([[0, 4], [5, 3], [1, 2]], jnp.int32)          # row 2: nothing held here
    w = jnp.asarray(rng.uniform(0.2, 0.8, (n, k)), jnp.float32)
    mats = [jnp.asarray(rng.standard_normal(s) * 0.05, jnp.bfloat16) for s in ((e_local, d, f), (e_local, d, f),
                                                                             (e_local, f, d))]
    arrays = ExpertArrays(*mats, num_experts=e_local)
    new = moe_ffn(x, w, experts, arrays, 3, strategy="gemv")
    old = moe_ffn(x, w, experts, arrays, 3, strategy="gemv", epilogue="xla")
    assert rel(new, old) < 2e-3
    assert np.all(np.asarray(new[2]) == 0.0)
    with pytest.raises(ValueError, match="first_expert=3"):
        moe_ffn(x, w, experts, arrays, 3, groups=experts.reshape(-1))


@pytest.mark.parametrize("epilogue", ["xla", "pallas"])
def test_tiny_model_decode_epilogue_follows_the_switch(epilogue, monkeypatch):
    """One device, kernels on: the model's MoE decode step uses the routing kernel's groups and,
    with moe_ffn.EPILOGUE = "pallas", traces the swiglu and combine kernels (default "xla": not)."""
    from qwen3_jax import Qwen3MoeConfig, kernels, random_model
    from qwen3_jax.kernels import moe_ffn as moe_mod
    from reference import TINY, prefill_then_decode

    monkeypatch.setattr(moe_mod, "EPILOGUE", epilogue)
    cfg = Qwen3MoeConfig.from_dict(dict(TINY, model_type="qwen3_moe", num_hidden_layers=2, num_experts=16))
    m = random_model(cfg, seed=6)
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, cfg.vocab_size, (1, 4)), jnp.int32)
    with kernels.kernels_enabled(True):
        jaxpr = str(jax.make_jaxpr(prefill_then_decode(m, tokens, 8))(m.state, tokens))
    assert "qwen3_router_topk" in jaxpr
    for name in ("qwen3_moe_swiglu", "qwen3_moe_combine"):
        assert (name in jaxpr) == (epilogue == "pallas"), name


# -- CPU: Triton lowering of a 30B-A3B layer (no GPU needed, nothing allocated) ----------------

def _layer_fn(fp8, groups=True, epilogue="pallas"):
    """route + expert FFN of one 30B-A3B layer read in place from the stacked params."""
    import functools

    from qwen3_jax.kernels import moe_ffn as moe_mod

    def fn(x, router, layer, gate, up, down, *scales):
        routed = route_in_place(x, router, layer, K30, True, with_groups=groups, interpret=False)
        w, ex, grp = routed if groups else (*routed, None)
        arrays = moe_mod.ExpertArrays.from_stacked(gate, up, down, scales if fp8 else None, layer=layer)
        return moe_mod.moe_ffn(x, w, ex, arrays, groups=grp, epilogue=epilogue, interpret=False)
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
def test_30b_layer_lowers_to_six_kernels_and_no_xla_arithmetic(fp8, n):
    text = jax.jit(_layer_fn(fp8)).trace(*_layer_shapes(n, fp8)).lower(lowering_platforms=("cuda",)).as_text()
    names = re.findall(r'name = "(qwen3_[a-z0-9_]+)"', text)
    mode = GEMV_DEFAULTS["fp8" if fp8 else "bf16"]["mode"]   # the kernel's name follows the gemv mode
    gemv = "qwen3_gemv" + ("_dot" if mode == "dot" else "") + ("_fp8" if fp8 else "")
    assert names == ["qwen3_gemv_dot", "qwen3_router_topk", gemv, "qwen3_moe_swiglu", gemv, "qwen3_moe_combine"]
    assert text.count("xla.gpu.triton") == 6
    ops = set(re.findall(r"(stablehlo\.[a-z_]+)", text))
    # reshapes are bitcasts, constants are the row indices; at N > 1 the router's per-row layer
    # index is a broadcast (outside the MoE). Nothing else: no iota, select, reduce, arithmetic.
    allowed = {"stablehlo.custom_call", "stablehlo.reshape", "stablehlo.constant"}
    allowed |= {"stablehlo.broadcast_in_dim"} if n > 1 else set()
    assert ops <= allowed, ops - allowed


# -- GPU: compiled kernels against the previous path --------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("n", [1, 8])
def test_gpu_fused_moe_matches_the_previous_path_at_30b_shapes(fp8, n):
    """2 stacked layers of 30B-A3B shapes (layer 1 read in place), N tokens of top-8 routing."""
    rng = np.random.default_rng(n + 2 * fp8)
    x = jnp.asarray(rng.standard_normal((n, D30)), jnp.bfloat16)
    router = jnp.asarray(0.02 * rng.standard_normal((2, D30, E30)), jnp.bfloat16)
    gate, up, down, scales = stacked_experts(n, 2, E30, D30, F30, fp8, block=128)
    sc = scales or ()
    layer = jnp.int32(1)
    new = jax.jit(_layer_fn(fp8))(x, router, layer, gate, up, down, *sc)
    old = jax.jit(_layer_fn(fp8, groups=False, epilogue="xla"))(x, router, layer, gate, up, down, *sc)
    assert rel(new, old) < 2e-3


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True])
def test_gpu_compiled_30b_layer_has_no_xla_kernel_between_the_moe_kernels(fp8):
    """Batch 1: the optimized HLO of route + experts holds the six Pallas kernels and at most two
    small XLA fusions (each a 1-3 us kernel launch on the H100). On jax 0.11.2 / H100 (run 6)
    XLA kept two fusions, after the 2nd and the 4th kernel; the check guards against more."""
    compiled = jax.jit(_layer_fn(fp8)).trace(*_layer_shapes(1, fp8)).lower().compile()
    text = compiled.as_text()
    ops = entry_opcodes(text)
    free = {"parameter", "constant", "bitcast", "get-tuple-element", "tuple"}    # no kernel launched
    launched = [op for op in ops if op not in free]
    print("launched:", launched)
    print("\n".join(line for line in text.splitlines() if "ROOT" in line and "fused" in line)[:3000])
    assert launched.count("custom-call") == 6 and len(launched) <= 8, launched


def entry_opcodes(hlo: str) -> list:
    """Opcodes of the ENTRY computation's instructions in optimized HLO text, in order; a `call`
    (XLA's command buffers wrap runs of kernels in one) is replaced by its callee's opcodes."""
    comps, name = {}, None
    for line in hlo.splitlines():
        head = re.match(r"^(ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head:
            name = "ENTRY" if head.group(1) else head.group(2)
            comps[name] = []
        elif line.startswith("}"):
            name = None
        elif name is not None and " = " in line:
            comps[name].append(line)

    def opcodes(comp):
        out = []
        for line in comps[comp]:
            rest = line.split(" = ", 1)[1]
            if rest.startswith("("):          # a tuple type: skip to its closing parenthesis
                depth = 0
                for i, ch in enumerate(rest):
                    depth += {"(": 1, ")": -1}.get(ch, 0)
                    if depth == 0:
                        rest = rest[i + 1:]
                        break
            else:
                rest = rest.split(" ", 1)[1]
            op = rest.strip().split("(", 1)[0]
            callee = re.search(r"to_apply=%?([\w.\-]+)", line)
            out += opcodes(callee.group(1)) if op == "call" and callee else [op]
        return out
    return opcodes("ENTRY")


def test_entry_opcodes_reads_optimized_hlo():
    def fn(x, y):
        return jnp.sin(x) + y, (x * 2).reshape(-1)
    hlo = jax.jit(fn).lower(jnp.ones((4, 4)), jnp.ones((4, 4))).compile().as_text()
    ops = entry_opcodes(hlo)
    assert ops.count("parameter") == 2 and ops.count("fusion") == 2 and ops[-1] == "tuple", ops
    wrapped = ("%cb (p: f32[4]) -> f32[4] {\n  %p = f32[4]{0} parameter(0)\n"
               "  ROOT %k = (f32[4]{0}, s32[1]{0}) custom-call(%p), custom_call_target=\"t\"\n}\n\n"
               "ENTRY %main (a: f32[4]) -> f32[4] {\n  %a = f32[4]{0} parameter(0)\n"
               "  ROOT %c = f32[4]{0} call(%a), to_apply=%cb\n}\n")
    assert entry_opcodes(wrapped) == ["parameter", "parameter", "custom-call"]
