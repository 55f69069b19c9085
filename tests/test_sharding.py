"""The equivalence suite: every mesh gives the single-device answers and holds only its share.

One tiny transformers checkpoint per module (8 query heads, 2 KV heads so tp=4/8 replicate KV
heads, 8 experts, moe_intermediate 32, a dense layer then two MoE layers), loaded once per mesh.
For each mesh: float32 logits equal the single-device logits within 1e-5 relative, 32 greedy
tokens are identical, and every weight (and the KV cache) is laid out as the rules say.

The expected layout is derived here from the mesh semantics in DESIGN.md, not from
sharding.rules: each logical axis is split tp, ep or N/ep ways, and device p of the mesh
(row-major over jax.devices()) has data rank p // tp, tensor rank p % tp, expert rank
p // (N/ep) and expert-tensor rank p % (N/ep); each shard's index must be that rank's slice.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import require_reference
from reference import TINY, make_hf_checkpoint, rel_err

import qwen3_jax
from sharding.layout import human_bytes, layout_rows, layout_table

# spec -> (N devices, dp, tp, ep), by hand from DESIGN.md: N = dp x tp, dp = ep/tp when ep > tp.
MESHES = {
    "tp=1": (1, 1, 1, 1),
    "tp=2": (2, 1, 2, 1),
    "tp=4": (4, 1, 4, 1),
    "tp=8": (8, 1, 8, 1),
    "ep=2": (2, 2, 1, 2),
    "ep=4": (4, 4, 1, 4),
    "ep=8": (8, 8, 1, 8),
    "tp=2,ep=2": (2, 1, 2, 2),
    "tp=2,ep=4": (4, 2, 2, 4),
    "tp=4,ep=8": (8, 2, 4, 8),
    "dp=2,tp=4": (8, 2, 4, 1),
    "tp=8,ep=8": (8, 1, 8, 8),
    "dp=4,tp=2,ep=2": (8, 4, 2, 2),  # ep < dp: the other arrangement of the three mesh axes
}
EQUIVALENCE = [m for m in MESHES if m != "dp=4,tp=2,ep=2"]  # the list; the extra one is layout-only
OVERRIDES = dict(mlp_only_layers=[0])  # dense layer 0, MoE layers 1-2: covers the 'mlp' axis too
TOKENS = np.random.default_rng(7).integers(0, TINY["vocab_size"], (2, 8))
NEW_TOKENS = 32
TOL = 1e-5

# Which view splits each logical axis (None: replicated): the DESIGN.md table, written out.
VIEW = {"vocab": "tensor", "heads": "tensor", "kv_heads": "tensor", "mlp": "tensor",
        "experts": "expert", "expert_mlp": "expert_tensor", "batch": "data"}


def view_sizes(spec: str) -> dict[str, int]:
    n, dp, tp, ep = MESHES[spec]
    return {"data": dp, "tensor": tp, "expert": ep, "expert_tensor": n // ep}


def device_ranks(spec: str, position: int) -> dict[str, int]:
    n, dp, tp, ep = MESHES[spec]
    etp = n // ep
    return {"data": position // tp, "tensor": position % tp, "expert": position // etp,
            "expert_tensor": position % etp}


def expected_index(spec, logical_axes, shape, position) -> tuple[tuple[int, int], ...]:
    """(start, stop) per dim of the shard device `position` must hold."""
    sizes, ranks = view_sizes(spec), device_ranks(spec, position)
    out = []
    for name, dim in zip(logical_axes, shape):
        view = VIEW.get(name)
        ways = sizes[view] if view and dim % sizes[view] == 0 else 1
        rank = ranks[view] if ways > 1 else 0
        out.append((rank * dim // ways, (rank + 1) * dim // ways))
    return tuple(out)


def _span(index, shape):
    return tuple((s.start or 0, dim if s.stop is None else s.stop) for s, dim in zip(index, shape))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    require_reference()
    return make_hf_checkpoint(str(tmp_path_factory.mktemp("sharding_tiny")), seed=11, **OVERRIDES)


_models: dict = {}


@pytest.fixture(scope="module")
def load(checkpoint):
    """load(spec) -> the float32 Model under that mesh, loaded once per module (None: one device)."""
    def get(spec):
        if spec not in _models:
            _models[spec] = qwen3_jax.load(checkpoint, mesh=spec, dtype="float32", progress=False)
        return _models[spec]
    yield get
    _models.clear()


@pytest.fixture(scope="module")
def reference(load):
    model = load(None)
    return model.logits(TOKENS), model.generate_greedy(TOKENS, NEW_TOKENS)


@pytest.mark.parametrize("spec", EQUIVALENCE)
def test_mesh_matches_single_device(spec, load, reference):
    ref_logits, ref_tokens = reference
    model = load(spec)
    assert model.mesh_spec.num_devices == MESHES[spec][0]
    logits = model.logits(TOKENS)
    err = rel_err(logits, ref_logits)
    assert err <= TOL, f"{spec}: logits differ from one device by {err:.2e} (relative)"
    tokens = model.generate_greedy(TOKENS, NEW_TOKENS)
    assert tokens.shape == (TOKENS.shape[0], NEW_TOKENS)
    np.testing.assert_array_equal(tokens, ref_tokens, err_msg=f"{spec}: greedy tokens differ")


def _leaves(model):
    flat = jax.tree_util.tree_flatten_with_path(model.state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
    for path, var in flat:
        name = ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        yield name, tuple(var.get_metadata()["logical_axes"]), var.get_value()


def _check_layout(spec, name, axes, arr):
    n = MESHES[spec][0]
    devices = jax.devices()[:n]
    sizes = view_sizes(spec)
    if n == 1:
        assert len(arr.addressable_shards) == 1 and arr.addressable_shards[0].data.shape == arr.shape
        return
    # The PartitionSpec splits each dim over mesh axes whose sizes multiply to the view's size.
    pspec = tuple(arr.sharding.spec) + (None,) * (arr.ndim - len(arr.sharding.spec))
    mesh_shape = dict(arr.sharding.mesh.shape)
    for dim, (logical, entry) in enumerate(zip(axes, pspec)):
        view = VIEW.get(logical)
        want = sizes[view] if view else 1
        got = 1 if entry is None else math.prod(mesh_shape[a] for a in ((entry,) if isinstance(entry, str) else entry))
        assert got == want, f"{spec} {name} dim {dim} ({logical}): split {got} ways, expected {want} ({pspec})"
    assert {s.device for s in arr.addressable_shards} == set(devices)
    for shard in arr.addressable_shards:
        position = devices.index(shard.device)
        want = expected_index(spec, axes, arr.shape, position)
        assert _span(shard.index, arr.shape) == want, f"{spec} {name} on device {position}"
        assert shard.data.shape == tuple(b - a for a, b in want)


@pytest.mark.parametrize("spec", list(MESHES))
def test_every_weight_where_the_rules_say(spec, load):
    model = load(spec)
    names = []
    for name, axes, arr in _leaves(model):
        _check_layout(spec, name, axes, arr)
        names.append(name)
    assert any("mlp.gate_proj" in n for n in names) and any("attn.k_proj" in n for n in names)


@pytest.mark.parametrize("spec", list(MESHES))
def test_kv_cache_where_the_rules_say(spec, load):
    model = load(spec)
    cache = model.init_cache(num_slots=8, max_len=16)
    axes = ("layers", "batch", "cache_seq", "kv_heads", "head_dim")
    for arr in cache.k + cache.v:
        _check_layout(spec, "kv cache", axes, arr)
        tp = MESHES[spec][2]
        heads_here = arr.addressable_shards[0].data.shape[3]
        assert heads_here == max(1, TINY["num_key_value_heads"] // tp)  # tp > KV heads: one (copy) each


@pytest.mark.parametrize("spec", list(MESHES))
def test_bytes_per_device_match_layout_table(spec, load):
    """Bytes actually resident on every device == the layout table's prediction from the rules."""
    model = load(spec)
    rows = layout_rows(model)
    predicted = sum(r.bytes_per_device for r in rows)
    actual = model.param_bytes_per_device()
    assert len(actual) == MESHES[spec][0]
    assert set(actual.values()) == {predicted}, f"{spec}: {sorted(set(actual.values()))} vs {predicted}"
    for row, (name, axes, arr) in zip(rows, _leaves(model)):
        assert row.name == name and row.shard_shape == arr.addressable_shards[0].data.shape
    lines = layout_table(model).splitlines()  # the notebook view: mesh line, one row a weight, totals
    assert lines[0] == model.mesh_spec.describe() and len(lines) == len(rows) + 5
    assert lines[-1].startswith(f"total ({len(rows)} weights)") and lines[-1].endswith(human_bytes(predicted))


@pytest.mark.parametrize("spec", ["ep=8", "tp=4,ep=8", "tp=8,ep=8"])
def test_expert_weights_split_eight_ways_under_ep8(spec, load):
    """No silent fallback to replicated experts: each of the 8 devices holds exactly one expert."""
    model = load(spec)
    expert_leaves = [(n, a, x) for n, a, x in _leaves(model) if "experts" in a]
    assert len(expert_leaves) == 3  # gate, up, down of the MoE segment
    for name, axes, arr in expert_leaves:
        e = axes.index("experts")
        entry = arr.sharding.spec[e]
        mesh_axes = (entry,) if isinstance(entry, str) else tuple(entry)
        assert math.prod(dict(arr.sharding.mesh.shape)[a] for a in mesh_axes) == 8, (name, arr.sharding.spec)
        starts = sorted(_span(s.index, arr.shape)[e][0] for s in arr.addressable_shards)
        assert starts == list(range(8)), name  # expert j lives on exactly one device
        assert all(s.data.shape[e] == 1 for s in arr.addressable_shards)
        assert all(s.data.nbytes * 8 == arr.nbytes for s in arr.addressable_shards)


@pytest.mark.parametrize("spec,vocab", [("tp=2", 64), ("tp=4", 64), ("tp=2,ep=4", 64), ("tp=4", 66)])
def test_embedding_lookup_per_vocab_shard_equals_the_whole_table(spec, vocab):
    """model.embed_rows: each device looks up the ids in its own rows, a psum completes them; the
    same rows, bit for bit, as indexing the whole table, for ids at every shard's first and last
    row, at batch 1 (the case XLA partitions by all-gathering the table) and batch 4. vocab 66 does
    not split 4 ways, so the table stays whole and the plain lookup runs."""
    from qwen3_jax.model import embed_rows

    ctx = qwen3_jax.api.build_context(qwen3_jax.config.load_preset("Qwen3-30B-A3B"), spec, None)[1]
    tp = qwen3_jax.api.parse_mesh_spec(spec).tp
    table = np.random.RandomState(0).randn(vocab, 16).astype(np.float32)
    sharded = jax.device_put(table, ctx.sharding(("vocab", "embed"), table.shape))
    rows = vocab // tp if vocab % tp == 0 else vocab
    assert {len(s.data) for s in sharded.addressable_shards} == {rows}
    edges = sorted({i for p in range(0, vocab, rows) for i in (p, p + rows - 1)} | {vocab // 2 + 1})
    for ids in (np.array([[edges[-2]]]), np.array((edges * 4)[:8]).reshape(4, 2)):
        got = jax.jit(lambda t, i: embed_rows(t, i, ctx))(sharded, jnp.asarray(ids, jnp.int32))
        np.testing.assert_array_equal(np.asarray(got), table[ids])
