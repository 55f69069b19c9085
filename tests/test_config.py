"""Qwen3MoeConfig: presets match the published config.json values, both spellings parse alike,
to_hf_dict round-trips (through transformers too), yarn frequencies equal transformers'."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from conftest import require_reference

from qwen3_jax.config import (ConfigError, Qwen3MoeConfig, load_preset, preset_names, resolve_config,
                              yarn_inv_freq)

# DESIGN.md's table of published values (Qwen3-30B-A3B, Qwen3-235B-A22B).
PUBLISHED = {
    "Qwen3-30B-A3B": dict(num_hidden_layers=48, hidden_size=2048, num_attention_heads=32, num_key_value_heads=4,
                          head_dim=128, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
                          intermediate_size=6144),
    "Qwen3-235B-A22B": dict(num_hidden_layers=94, hidden_size=4096, num_attention_heads=64, num_key_value_heads=4,
                            head_dim=128, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=1536,
                            intermediate_size=12288),
}
COMMON = dict(vocab_size=151936, norm_topk_prob=True, tie_word_embeddings=False, rms_norm_eps=1e-6,
              decoder_sparse_step=1, mlp_only_layers=(), bos_token_id=151643, eos_token_id=151645,
              attention_bias=False)
# The 2507 Instruct releases change only the context: 262144 positions and a larger rope base
# (Qwen/Qwen3-30B-A3B-Instruct-2507 ships rope_theta 10000000, the 235B one 5000000).
CONTEXT = {
    "Qwen3-30B-A3B": (40960, 1_000_000.0), "Qwen3-30B-A3B-FP8": (40960, 1_000_000.0),
    "Qwen3-235B-A22B": (40960, 1_000_000.0), "Qwen3-235B-A22B-FP8": (40960, 1_000_000.0),
    "Qwen3-30B-A3B-Instruct-2507": (262144, 10_000_000.0),
    "Qwen3-235B-A22B-Instruct-2507": (262144, 5_000_000.0),
}


def _family(name: str) -> str:
    return "Qwen3-30B-A3B" if name.startswith("Qwen3-30B-A3B") else "Qwen3-235B-A22B"


def test_every_listed_model_has_a_preset():
    assert sorted(CONTEXT) == preset_names()


@pytest.mark.parametrize("name", sorted(CONTEXT))
def test_preset_matches_published_values(name):
    cfg = load_preset(name)
    for field, value in {**PUBLISHED[_family(name)], **COMMON}.items():
        assert getattr(cfg, field) == value, f"{name}.{field} = {getattr(cfg, field)!r}, published {value!r}"
    assert (cfg.max_position_embeddings, cfg.rope.theta) == CONTEXT[name]
    assert cfg.rope.type == "default"
    assert cfg.name == name
    if name.endswith("-FP8"):
        assert (cfg.fp8.block_out, cfg.fp8.block_in) == (128, 128)
        base = load_preset(name[: -len("-FP8")])
        assert dataclasses.replace(cfg, fp8=None, name=base.name) == base, "FP8 preset differs beyond quantization"
    else:
        assert cfg.fp8 is None
    assert all(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    assert cfg.layer_segments() == [("moe", 0, cfg.num_hidden_layers)]


def test_resolve_config_by_name_path_and_error(tmp_path):
    assert resolve_config("Qwen3-30B-A3B-FP8") == load_preset("Qwen3-30B-A3B-FP8")
    assert resolve_config("Qwen/Qwen3-30B-A3B-Instruct-2507").rope.theta == 10_000_000.0
    (tmp_path / "config.json").write_text(json.dumps(load_preset("Qwen3-235B-A22B").to_hf_dict()))
    assert resolve_config(str(tmp_path)).num_hidden_layers == 94
    with pytest.raises(ConfigError, match="neither a checkpoint directory nor a preset.*Qwen3-30B-A3B"):
        resolve_config("Qwen3-31B")


# -- round trips -----------------------------------------------------------------------------

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=4,
            num_attention_heads=8, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
            max_position_embeddings=256, rope_theta=10000.0, bos_token_id=1, eos_token_id=[2, 3])
VARIANTS = {
    "plain": {},
    "yarn_full": dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                                    "beta_fast": 16.0, "beta_slow": 2.0, "mscale": 0.707, "mscale_all_dim": 0.707,
                                    "truncate": False}),
    "yarn_attention_factor": dict(rope_scaling={"type": "yarn", "factor": 2.0, "attention_factor": 1.2}),
    "mixed_bias_tied": dict(mlp_only_layers=[0, 2], decoder_sparse_step=2, attention_bias=True,
                            tie_word_embeddings=True, norm_topk_prob=False),
    "fp8": dict(quantization_config={"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                     "weight_block_size": [128, 64], "modules_to_not_convert": ["lm_head"]}),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_to_hf_dict_round_trips(variant):
    cfg = Qwen3MoeConfig.from_dict({"model_type": "qwen3_moe", **TINY, **VARIANTS[variant]}, name=variant)
    again = Qwen3MoeConfig.from_dict(json.loads(json.dumps(cfg.to_hf_dict())), name=variant)
    assert again == cfg


@pytest.mark.parametrize("name", sorted(CONTEXT))
def test_presets_round_trip(name):
    cfg = load_preset(name)
    assert Qwen3MoeConfig.from_dict(cfg.to_hf_dict(), name=name) == cfg


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "fp8"])
def test_transformers_reads_our_dict_and_writes_what_we_read(variant):
    """to_hf_dict -> transformers' Qwen3MoeConfig -> its config.json (new spelling) -> ours again."""
    require_reference()
    from transformers import Qwen3MoeConfig as HfConfig

    cfg = Qwen3MoeConfig.from_dict({"model_type": "qwen3_moe", **TINY, **VARIANTS[variant]}, name=variant)
    hf = HfConfig(**cfg.to_hf_dict())
    assert hf.num_experts == cfg.num_experts and hf.mlp_only_layers == list(cfg.mlp_only_layers)
    written = json.loads(hf.to_json_string())
    assert "rope_parameters" in written  # transformers 5.x spelling
    assert Qwen3MoeConfig.from_dict(written, name=variant) == cfg


def test_both_spellings_parse_alike():
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    published = {"model_type": "qwen3_moe", **TINY, "rope_theta": 1e6, "rope_scaling": yarn}
    new = {k: v for k, v in published.items() if k not in ("num_experts", "rope_theta", "rope_scaling")}
    new.update(num_local_experts=8, rope_parameters={**yarn, "rope_theta": 1e6})
    a, b = Qwen3MoeConfig.from_dict(published), Qwen3MoeConfig.from_dict(new)
    assert a == b
    assert (a.num_experts, a.rope.theta, a.rope.type, a.rope.factor) == (8, 1e6, "yarn", 4.0)
    # The older rope_scaling spelling {"type": "yarn"} names the same thing.
    old_type = dict(published, rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768})
    assert Qwen3MoeConfig.from_dict(old_type) == a


# -- validation ------------------------------------------------------------------------------

@pytest.mark.parametrize("override, words", [
    (dict(num_key_value_heads=3), ["num_attention_heads=8", "num_key_value_heads=3"]),
    (dict(num_experts_per_tok=9), ["num_experts_per_tok=9", "num_experts=8"]),
    (dict(decoder_sparse_step=0), ["decoder_sparse_step=0"]),
    (dict(head_dim=15), ["head_dim=15", "even"]),
    (dict(rope_scaling={"rope_type": "yarn"}), ["yarn", "factor"]),
    (dict(quantization_config={"quant_method": "gptq"}), ["'gptq'", "fp8"]),
    (dict(quantization_config={"quant_method": "fp8", "weight_block_size": None}), ["weight_block_size", "[128, 128]"]),
])
def test_inconsistent_config_is_refused_with_numbers(override, words):
    with pytest.raises(ConfigError) as e:
        Qwen3MoeConfig.from_dict({"model_type": "qwen3_moe", **TINY, **override})
    for w in words:
        assert w in str(e.value), f"{w!r} not in: {e.value}"


def test_missing_expert_count_is_named():
    d = {"model_type": "qwen3_moe", **TINY}
    d.pop("num_experts")
    with pytest.raises(ConfigError, match="num_experts nor num_local_experts"):
        Qwen3MoeConfig.from_dict(d)


# -- yarn against transformers ---------------------------------------------------------------

YARN_CASES = [
    # (rope_theta, head_dim, max_position_embeddings, rope parameters)
    (1e6, 128, 131072, {"factor": 4.0, "original_max_position_embeddings": 32768}),   # Qwen3 README setting
    (5e6, 128, 1048576, {"factor": 4.0, "original_max_position_embeddings": 262144}),  # 2507 long context
    (1e4, 16, 256, {"factor": 4.0, "original_max_position_embeddings": 64}),            # the parity test's
    (1e4, 64, 4096, {"factor": 8.0, "original_max_position_embeddings": 512, "beta_fast": 16, "beta_slow": 2,
                     "mscale": 0.707, "mscale_all_dim": 1.0, "truncate": False}),
    (1e4, 32, 2048, {"factor": 2.0, "original_max_position_embeddings": 1024, "attention_factor": 1.3}),
]


@pytest.mark.parametrize("theta, head_dim, max_pos, params", YARN_CASES)
def test_yarn_frequencies_equal_transformers(theta, head_dim, max_pos, params):
    require_reference()
    from transformers import Qwen3MoeConfig as HfConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    d = {"model_type": "qwen3_moe", **TINY, "head_dim": head_dim, "max_position_embeddings": max_pos,
         "rope_theta": theta, "rope_scaling": {"rope_type": "yarn", **params}}
    ours = Qwen3MoeConfig.from_dict(d)
    inv, attn = yarn_inv_freq(ours.rope, head_dim, max_pos)
    hf_inv, hf_attn = ROPE_INIT_FUNCTIONS["yarn"](HfConfig(**{k: v for k, v in d.items() if k != "model_type"}))
    np.testing.assert_allclose(inv, hf_inv.numpy(), rtol=1e-6, atol=0)
    assert attn == pytest.approx(hf_attn, rel=1e-9)
    assert attn != 1.0 or params.get("attention_factor") == 1.0
