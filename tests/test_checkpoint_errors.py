"""Bad checkpoints fail in load() with errors that name the tensor, the file and the numbers;
unsupported configs are refused, never ignored; a two-shard checkpoint loads exactly."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from conftest import require_reference
from reference import TINY, hf_logits, hf_model, make_hf_checkpoint, rel_err

import qwen3_jax
from qwen3_jax import CheckpointError, ConfigError
from qwen3_jax.safetensors_io import SafetensorsCheckpoint, write_safetensors

WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> str:
    """A valid single-file float32 checkpoint of reference.TINY (3 MoE layers, untied lm_head)."""
    require_reference()
    return make_hf_checkpoint(str(tmp_path_factory.mktemp("good")), seed=3)


def _tensors(directory: str) -> dict[str, np.ndarray]:
    ckpt = SafetensorsCheckpoint(directory)
    return {name: np.array(ckpt.array(name)) for name in ckpt.keys()}


def _variant(good: str, tmp_path, tensors=None, config_edit=None) -> str:
    """A copy of `good` with its tensors replaced and/or config.json edited in place."""
    out = str(tmp_path / "ckpt")
    os.makedirs(out)
    with open(os.path.join(good, "config.json")) as f:
        cfg = json.load(f)
    if config_edit:
        config_edit(cfg)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f)
    if tensors is None:
        os.link(os.path.join(good, WEIGHTS), os.path.join(out, WEIGHTS))
    else:
        write_safetensors(os.path.join(out, WEIGHTS), tensors)
    return out


def _load_error(directory: str, error=CheckpointError) -> str:
    with pytest.raises(error) as e:
        qwen3_jax.load(directory, dtype="float32", progress=False)
    return str(e.value)


def _assert_names(message: str, *words):
    for w in words:
        assert w in message, f"{w!r} not in error: {message}"


# -- tensors ---------------------------------------------------------------------------------

def test_missing_tensor_is_named(good, tmp_path):
    tensors = _tensors(good)
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    del tensors[name]
    directory = _variant(good, tmp_path, tensors)
    _assert_names(_load_error(directory), name, directory, "missing", "config.json")


def test_several_missing_tensors_are_counted(good, tmp_path):
    tensors = _tensors(good)
    gone = [n for n in tensors if n.startswith("model.layers.2.")]
    for n in gone:
        del tensors[n]
    msg = _load_error(_variant(good, tmp_path, tensors))
    _assert_names(msg, "model.layers.2.", f"and {len(gone) - 1} more")


def test_missing_lm_head_when_untied_is_named(good, tmp_path):
    tensors = _tensors(good)
    del tensors["lm_head.weight"]
    _assert_names(_load_error(_variant(good, tmp_path, tensors)), "lm_head.weight", "missing")


def test_extra_tensor_is_named_with_its_file(good, tmp_path):
    tensors = _tensors(good)
    name = f"model.layers.0.mlp.experts.{TINY['num_experts']}.up_proj.weight"  # one expert too many
    tensors[name] = tensors["model.layers.0.mlp.experts.0.up_proj.weight"].copy()
    _assert_names(_load_error(_variant(good, tmp_path, tensors)), name, WEIGHTS, "unexpected")


def test_config_with_fewer_experts_than_the_weights(good, tmp_path):
    """A config.json from another model: the first expert it does not know about is reported."""
    directory = _variant(good, tmp_path, config_edit=lambda c: c.update(num_local_experts=4))
    _assert_names(_load_error(directory), "model.layers.0.mlp.experts.4.", WEIGHTS, "unexpected")


def test_wrong_shape_is_named_with_file_and_shapes(good, tmp_path):
    tensors = _tensors(good)
    name = "model.layers.2.self_attn.k_proj.weight"
    kq, d = tensors[name].shape  # [K*Q, D] = [32, 64]
    tensors[name] = np.zeros((kq + 16, d), np.float32)
    msg = _load_error(_variant(good, tmp_path, tensors))
    _assert_names(msg, name, WEIGHTS, f"[{kq + 16}, {d}]", f"[{kq}, {d}]")


def test_wrong_expert_shape_is_named(good, tmp_path):
    tensors = _tensors(good)
    name = "model.layers.1.mlp.experts.5.down_proj.weight"
    tensors[name] = tensors[name].T.copy()  # [F, D] instead of [D, F]
    d, f = TINY["hidden_size"], TINY["moe_intermediate_size"]
    _assert_names(_load_error(_variant(good, tmp_path, tensors)), name, f"[{f}, {d}]", f"[{d}, {f}]")


# -- files -----------------------------------------------------------------------------------

def test_truncated_file_is_named(good, tmp_path):
    directory = _variant(good, tmp_path, tensors=_tensors(good))
    path = os.path.join(directory, WEIGHTS)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 100)
    msg = _load_error(directory)
    _assert_names(msg, path, "truncated", str(size - 100))
    assert "tensor " in msg  # names the tensor that runs past the end


def test_garbage_header_is_named(good, tmp_path):
    directory = _variant(good, tmp_path, tensors={})
    with open(os.path.join(directory, WEIGHTS), "wb") as f:
        f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    _assert_names(_load_error(directory), WEIGHTS, "not a readable safetensors file")


def test_no_weights_at_all(good, tmp_path):
    directory = str(tmp_path)
    shutil.copy(os.path.join(good, "config.json"), directory)
    _assert_names(_load_error(directory), "no *.safetensors", "model.safetensors.index.json")


# -- sharded checkpoints ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def sharded(good, tmp_path_factory) -> str:
    """The good checkpoint re-saved by transformers in two shards with model.safetensors.index.json."""
    directory = str(tmp_path_factory.mktemp("sharded"))
    total = os.path.getsize(os.path.join(good, WEIGHTS))
    hf_model(good).save_pretrained(directory, max_shard_size=int(total * 0.6))
    return directory


def _shards(directory: str) -> list[str]:
    return sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))


def test_two_shards_load_exactly(good, sharded):
    shards = _shards(sharded)
    assert len(shards) == 2, shards
    with open(os.path.join(sharded, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    assert sorted(set(weight_map.values())) == shards
    model = qwen3_jax.load(sharded, dtype="float32", progress=False)
    tokens = np.random.default_rng(0).integers(0, TINY["vocab_size"], (2, 24))
    err = rel_err(model.logits(tokens), hf_logits(hf_model(good), tokens))
    assert err <= 1e-5, f"two-shard checkpoint: logits differ from transformers by {err:.2e}"


def _copy(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def test_index_listing_a_missing_file(sharded, tmp_path):
    directory = _copy(sharded, tmp_path / "ckpt")
    gone = _shards(directory)[1]
    os.remove(os.path.join(directory, gone))
    _assert_names(_load_error(directory), gone, "model.safetensors.index.json", "missing")


def test_index_pointing_at_the_wrong_shard(sharded, tmp_path):
    directory = _copy(sharded, tmp_path / "ckpt")
    index_path = os.path.join(directory, "model.safetensors.index.json")
    with open(index_path) as f:
        index = json.load(f)
    first, second = _shards(directory)
    name = next(n for n, f in index["weight_map"].items() if f == first)
    index["weight_map"][name] = second
    with open(index_path, "w") as f:
        json.dump(index, f)
    _assert_names(_load_error(directory), name, second, "does not contain it")


# -- unsupported configs ---------------------------------------------------------------------

def _set_rope(params):
    def edit(c):
        c["rope_parameters"] = {"rope_theta": c["rope_parameters"]["rope_theta"], **params}
    return edit


@pytest.mark.parametrize("edit, words", [
    (lambda c: c.update(use_sliding_window=True, sliding_window=64), ["use_sliding_window=true", "not supported"]),
    (_set_rope({"rope_type": "longrope", "factor": 2.0, "short_factor": [1.0] * 8, "long_factor": [1.0] * 8,
                "original_max_position_embeddings": 64}), ["'longrope'", "not supported", "default, yarn"]),
    (_set_rope({"rope_type": "dynamic", "factor": 2.0}), ["'dynamic'", "not supported", "default, yarn"]),
    (lambda c: c.update(model_type="qwen3"), ["model_type='qwen3'", "qwen3_moe"]),
    (lambda c: c.update(quantization_config={"quant_method": "awq", "bits": 4}), ["'awq'", "fp8"]),
], ids=["sliding_window", "longrope", "dynamic", "qwen3_dense", "awq"])
def test_unsupported_config_is_refused(good, tmp_path, edit, words):
    directory = _variant(good, tmp_path, config_edit=edit)
    _assert_names(_load_error(directory, ConfigError), *words)


def test_missing_config_json(good, tmp_path):
    os.link(os.path.join(good, WEIGHTS), tmp_path / WEIGHTS)
    with pytest.raises(FileNotFoundError, match="config.json"):
        qwen3_jax.load(str(tmp_path), progress=False)
