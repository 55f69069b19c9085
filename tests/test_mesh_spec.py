"""--mesh specs: what valid specs resolve to, and the documented error for every invalid one.

Every error must name the offending numbers, suggest `--mesh` specs that really are valid (each
suggestion is parsed and checked against the same model here), and come before any device
memory is used.
"""

from __future__ import annotations

import dataclasses
import json
import re

import jax
import pytest

from reference import TINY

import qwen3_jax
from qwen3_jax.api import build_context
from qwen3_jax.config import Qwen3MoeConfig
from sharding.mesh import (MeshSpec, MeshSpecError, config_problem, kv_replication, make_mesh,
                           parse_mesh_spec, valid_specs)

VISIBLE = 8
BASE = Qwen3MoeConfig.from_dict({**TINY, "model_type": "qwen3_moe"}, name="tiny")  # 8 heads, 2 KV, 8 experts


def cfg_with(**overrides) -> Qwen3MoeConfig:
    return dataclasses.replace(BASE, **overrides)


# spec -> (dp, tp, ep, num_devices, expert-tensor split, describe())
VALID = {
    "": (1, 1, 1, 1, 1, "mesh: 1 device | attention data=1 x tensor=1 | moe expert=1 x tensor=1"),
    "tp=8": (1, 8, 1, 8, 8, "mesh: 8 devices | attention data=1 x tensor=8 | moe expert=1 x tensor=8"),
    "ep=8": (8, 1, 8, 8, 1, "mesh: 8 devices | attention data=8 x tensor=1 | moe expert=8 x tensor=1"),
    "tp=4,ep=8": (2, 4, 8, 8, 1, "mesh: 8 devices | attention data=2 x tensor=4 | moe expert=8 x tensor=1"),
    "dp=2,tp=4": (2, 4, 1, 8, 8, "mesh: 8 devices | attention data=2 x tensor=4 | moe expert=1 x tensor=8"),
    "tp=2,ep=2": (1, 2, 2, 2, 1, "mesh: 2 devices | attention data=1 x tensor=2 | moe expert=2 x tensor=1"),
    "tp=2,ep=4": (2, 2, 4, 4, 1, "mesh: 4 devices | attention data=2 x tensor=2 | moe expert=4 x tensor=1"),
    "tp=4,ep=2": (1, 4, 2, 4, 2, "mesh: 4 devices | attention data=1 x tensor=4 | moe expert=2 x tensor=2"),
    "dp=4,tp=2,ep=2": (4, 2, 2, 8, 4, "mesh: 8 devices | attention data=4 x tensor=2 | moe expert=2 x tensor=4"),
    " tp = 4 , ep = 8 ": (2, 4, 8, 8, 1, "mesh: 8 devices | attention data=2 x tensor=4 | moe expert=8 x tensor=1"),
}


@pytest.mark.parametrize("text", list(VALID))
def test_valid_spec_resolves(text):
    dp, tp, ep, n, etp, line = VALID[text]
    spec = parse_mesh_spec(text)
    assert (spec.dp, spec.tp, spec.ep, spec.num_devices, spec.etp) == (dp, tp, ep, n, etp)
    assert spec.describe() == line
    assert parse_mesh_spec(str(spec)) == spec  # str() is a spec that parses back to the same mesh
    assert spec.shape[0] * spec.shape[1] * spec.shape[2] == n


def test_num_devices_fills_data_parallel():
    assert parse_mesh_spec("tp=2", num_devices=8) == MeshSpec(dp=4, tp=2, ep=1)
    assert parse_mesh_spec("tp=4,ep=8", num_devices=8) == MeshSpec(dp=2, tp=4, ep=8)


def test_kv_heads_replicate_when_tp_exceeds_them():
    assert [kv_replication(parse_mesh_spec(f"tp={t}"), BASE) for t in (1, 2, 4, 8)] == [1, 1, 2, 4]
    assert config_problem(parse_mesh_spec("tp=8"), BASE) is None


def test_every_suite_mesh_is_valid_for_the_tiny_model():
    valid = {str(s) for n in range(1, VISIBLE + 1) for s in valid_specs(BASE, n)}
    suite = ["tp=1", "tp=2", "tp=4", "tp=8", "ep=2", "ep=4", "ep=8", "tp=2,ep=2", "tp=2,ep=4", "tp=4,ep=8",
             "dp=2,tp=4", "tp=8,ep=8"]
    assert {str(parse_mesh_spec(s)) for s in suite} <= valid


# (spec, config overrides, fragments the message must contain). Config-level errors go through
# qwen3_jax's own build_context (parse, model checks, device count), as load() does.
INVALID = [
    ("tp=3", {}, ["num_attention_heads=8 is not divisible by tp=3", "8 % 3 = 2"]),
    ("ep=3", {}, ["num_experts=8 is not divisible by ep=3", "8 % 3 = 2"]),
    ("ep=4", dict(num_experts=6), ["num_experts=6 is not divisible by ep=4", "6 % 4 = 2"]),
    ("tp=6", dict(num_attention_heads=12, num_key_value_heads=4),
     ["tp=6 exceeds num_key_value_heads=4 but is not a multiple of it", "6 % 4 = 2"]),
    ("tp=3", dict(num_attention_heads=6, num_key_value_heads=2),
     ["tp=3 exceeds num_key_value_heads=2 but is not a multiple of it", "3 % 2 = 1"]),
    ("tp=3", dict(num_attention_heads=12, num_key_value_heads=4),
     ["num_key_value_heads=4 is not divisible by tp=3", "4 % 3 = 1"]),
    ("dp=2,tp=4", dict(moe_intermediate_size=36),
     ["moe_intermediate_size=36 is not divisible by its split 8", "8 devices / ep=1", "36 % 8 = 4"]),
    ("tp=8", dict(intermediate_size=100, mlp_only_layers=(0,)),
     ["intermediate_size=100 (dense MLP layers) is not divisible by tp=8", "100 % 8 = 4"]),
    ("tp=8", dict(vocab_size=100), ["vocab_size=100 is not divisible by tp=8", "100 % 8 = 4"]),
    ("dp=2,tp=4,ep=3", {}, ["ep=3 does not divide the 8 devices", "dp=2 x tp=4", "[1, 2, 4, 8]"]),
    ("tp=4,ep=6", {}, ["ep=6 is not a multiple of tp=4", "6/4"]),
    ("dp=3,tp=2,ep=2", {}, ["dp=3 and ep=2 must divide one another", "6 devices"]),
    ("dp=4,tp=4", {}, ["needs 16 devices but only 8 are visible"]),
    ("tp=16", dict(num_attention_heads=16, num_key_value_heads=2), ["needs 16 devices but only 8 are visible"]),
    ("tp4", {}, ["cannot parse mesh term 'tp4'", "did you mean 'tp=4'"]),
    ("TP=4,ep=8", {}, ["cannot parse mesh term 'TP=4'", "did you mean 'tp=4'"]),
    ("pp=2", {}, ["'pp' is not a mesh axis"]),
    ("tp=4;ep=8", {}, ["cannot parse mesh term 'tp=4;ep=8'"]),
    ("tp=2,tp=4", {}, ["tp is given twice", "tp=2 and tp=4"]),
    ("tp=0", {}, ["tp=0", "must be >= 1"]),
    ("ep=0,tp=2", {}, ["ep=0", "must be >= 1"]),
    ("dp=-2,tp=2", {}, ["dp=-2", "must be >= 1"]),
]


def _suggestions(message: str) -> list[str]:
    return re.findall(r"--mesh (\S+?)(?=[\s,;)]|$)", message)


@pytest.mark.parametrize("spec,overrides,fragments", INVALID, ids=[f"{s}|{o}" for s, o, _ in INVALID])
def test_invalid_spec_error(spec, overrides, fragments):
    cfg = cfg_with(**overrides)
    before = len(jax.live_arrays())
    with pytest.raises(MeshSpecError) as err:
        build_context(cfg, spec)
    message = str(err.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} missing from: {message}"
    assert len(jax.live_arrays()) == before  # refused on sizes alone
    suggested = _suggestions(message)
    assert suggested, f"no --mesh suggestion in: {message}"
    for text in suggested:  # every suggestion is a spec this model accepts on the visible devices
        good = parse_mesh_spec(text, cfg=cfg)
        assert config_problem(good, cfg) is None, (text, message)
        assert good.num_devices <= VISIBLE, (text, message)
        make_mesh(good, cfg=cfg)


def test_devices_not_divisible_by_tp():
    with pytest.raises(MeshSpecError, match=r"8 devices cannot be split into tensor groups of tp=3 \(8 % 3 = 2\)"):
        parse_mesh_spec("tp=3", num_devices=8, cfg=BASE)


def test_too_few_devices_suggests_what_fits():
    with pytest.raises(MeshSpecError) as err:
        make_mesh(parse_mesh_spec("tp=4,ep=8"), devices=jax.devices()[:4], cfg=BASE)
    message = str(err.value)
    assert "needs 8 devices but only 4 are visible" in message
    for text in _suggestions(message):
        assert parse_mesh_spec(text).num_devices <= 4 and config_problem(parse_mesh_spec(text), BASE) is None


def test_model_entry_points_refuse_before_allocating(tmp_path):
    """random_model and load refuse a bad mesh before creating arrays (load: before reading weights)."""
    before = len(jax.live_arrays())
    with pytest.raises(MeshSpecError, match="num_experts=8 is not divisible by ep=3"):
        qwen3_jax.random_model(BASE, mesh="ep=3", dtype="float32")
    # A checkpoint directory with only config.json: the mesh error must come before any weight
    # file is even looked for.
    (tmp_path / "config.json").write_text(json.dumps({**TINY, "model_type": "qwen3_moe"}))
    with pytest.raises(MeshSpecError, match="num_attention_heads=8 is not divisible by tp=3"):
        qwen3_jax.load(str(tmp_path), mesh="tp=3", progress=False)
    assert len(jax.live_arrays()) == before


def test_request_cpu_devices_replaces_an_earlier_count_and_keeps_other_flags():
    from sharding.mesh import request_cpu_devices

    env = {"XLA_FLAGS": "--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=2"}
    request_cpu_devices(8, env, configure_jax=False)
    assert env["XLA_FLAGS"] == "--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=8"
    empty = {}
    request_cpu_devices(4, empty, configure_jax=False)
    assert empty["XLA_FLAGS"] == "--xla_force_host_platform_device_count=4"
