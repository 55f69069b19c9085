"""Orbax round trip: HF safetensors -> python -m qwen3_jax.convert -> load under other meshes.

The reference is loading the HF checkpoint directly under the same mesh: params and logits must
be bitwise identical (same values, same shardings, same compiled program), for float32 and for
block-FP8, whatever mesh the checkpoint was converted under (tp=4 stores KV heads un-replicated).
"""

from __future__ import annotations

import json
import os
import shutil
import time

import jax
import numpy as np
import pytest

from conftest import require_reference
from qwen3_jax import CheckpointError, load
from qwen3_jax.orbax_io import META_FILE, PARAMS_DIR, is_orbax_checkpoint

TOKENS = np.array([[3, 17, 99, 42, 5, 64, 7, 120], [1, 2, 3, 4, 5, 6, 7, 8]], np.int32)
MESHES = [None, "tp=2", "tp=4,ep=8"]
FP8_QUANT = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}


def _leaves(model):
    return [v.get_value() if hasattr(v, "get_value") else v.value
            for v in jax.tree.leaves(model.state, is_leaf=lambda x: hasattr(x, "get_metadata"))]


def assert_same_model(restored, direct):
    """Every param bitwise equal with the same sharding, and the same logits bit for bit."""
    a_leaves, b_leaves = _leaves(restored), _leaves(direct)
    assert len(a_leaves) == len(b_leaves)
    for a, b in zip(a_leaves, b_leaves):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert a.sharding == b.sharding or a.sharding.is_equivalent_to(b.sharding, a.ndim)
        np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))
    la, lb = restored.logits(TOKENS), direct.logits(TOKENS)
    assert np.isfinite(lb).all() and np.abs(lb).max() > 0.1
    np.testing.assert_array_equal(la, lb)


def make_fp8_checkpoint(src: str, out: str) -> str:
    """Qwen's block-FP8 layout from a float32 HF checkpoint: quantizable linears e4m3 + scale_inv.

    Uses the project's quantizer (python -m qwen3_jax.quantize) where present, else writes the
    same layout here from fp8.quantize_blocks.
    """
    try:
        from qwen3_jax.quantize import quantize_checkpoint
    except ImportError:
        quantize_checkpoint = None
    if quantize_checkpoint is not None:
        quantize_checkpoint(src, out)
        return out
    from qwen3_jax.checkpoint import param_sources
    from qwen3_jax.config import Qwen3MoeConfig
    from qwen3_jax.fp8 import quantize_blocks
    from qwen3_jax.safetensors_io import SafetensorsCheckpoint, write_safetensors

    cfg = Qwen3MoeConfig.from_json(src)
    quantized = {n for s in param_sources(cfg).values() if s.quantizable
                 for layer in range(cfg.num_hidden_layers) for n in s.names(layer)}
    ckpt = SafetensorsCheckpoint(src)
    tensors = {}
    for name in ckpt.keys():
        w = np.asarray(ckpt.array(name))
        if name in quantized:
            tensors[name], tensors[name + "_scale_inv"] = quantize_blocks(w, (128, 128))
        else:
            tensors[name] = w.astype(jax.numpy.bfloat16)
    os.makedirs(out, exist_ok=True)
    write_safetensors(os.path.join(out, "model.safetensors"), tensors)
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = FP8_QUANT
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f)
    return out


# Every checkpoint directory here is named "ckpt": the config's name comes from it, and equal
# configs let the HF-loaded and the restored model share one compiled forward.
@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    require_reference()
    from reference import make_hf_checkpoint
    return make_hf_checkpoint(str(tmp_path_factory.mktemp("hf") / "ckpt"), seed=3)


@pytest.fixture(scope="module")
def orbax_dir(hf_dir, tmp_path_factory):
    """Converted through the CLI entry point, under tp=2."""
    from qwen3_jax.convert import main
    out = str(tmp_path_factory.mktemp("orbax") / "ckpt")
    assert main(["--model", hf_dir, "--out", out, "--mesh", "tp=2", "--dtype", "float32"]) == 0
    return out


@pytest.fixture(scope="module")
def fp8_dirs(hf_dir, tmp_path_factory):
    """(FP8 HF dir, its Orbax conversion under tp=4,ep=8: KV heads replicated 2x in memory, stored once)."""
    from qwen3_jax.convert import convert
    fp8 = make_fp8_checkpoint(hf_dir, str(tmp_path_factory.mktemp("hf_fp8") / "ckpt"))
    out = str(tmp_path_factory.mktemp("orbax_fp8") / "ckpt")
    meta = convert(fp8, out, mesh="tp=4,ep=8", dtype="bfloat16", progress=False)
    assert meta["fp8"] and meta["saved_from_mesh"] == "tp=4,ep=8"
    return fp8, out


def test_converted_directory(hf_dir, orbax_dir):
    assert is_orbax_checkpoint(orbax_dir) and not is_orbax_checkpoint(hf_dir)
    for name in ("config.json", "generation_config.json", META_FILE):
        assert os.path.exists(os.path.join(orbax_dir, name)), name
    assert not [f for f in os.listdir(orbax_dir) if f.endswith(".safetensors")]
    with open(os.path.join(orbax_dir, META_FILE)) as f:
        meta = json.load(f)
    # TINY has 2 KV heads: stored unreplicated whatever the conversion mesh.
    assert meta["params"]["segments/0/block/attn/k_proj/w"]["shape"] == [3, 64, 2, 16]
    assert meta["kv_rep"] == 1 and meta["dtype"] == "float32" and meta["saved_from_mesh"] == "tp=2"


@pytest.mark.parametrize("mesh", MESHES)
def test_round_trip_bitwise(hf_dir, orbax_dir, mesh, capsys):
    t0 = time.perf_counter()
    direct = load(hf_dir, mesh=mesh, dtype="float32", progress=False)
    jax.block_until_ready(_leaves(direct))
    t_hf = time.perf_counter() - t0
    t0 = time.perf_counter()
    restored = load(orbax_dir, mesh=mesh, dtype="float32")
    t_orbax = time.perf_counter() - t0
    assert restored.mesh_spec == direct.mesh_spec and restored.kv_rep == direct.kv_rep
    assert_same_model(restored, direct)
    with capsys.disabled():
        print(f"\n[tiny float32 load, mesh {mesh or 'one device'}] safetensors {t_hf * 1e3:.0f} ms, "
              f"orbax {t_orbax * 1e3:.0f} ms")


@pytest.mark.parametrize("mesh", MESHES)
def test_round_trip_fp8_bitwise(fp8_dirs, mesh):
    fp8, out = fp8_dirs
    direct = load(fp8, mesh=mesh, dtype="bfloat16", progress=False)
    restored = load(out, mesh=mesh, dtype="bfloat16")
    w = restored.state["segments"][0]["block"]["mlp"]["gate_proj"]["w"]
    assert str(getattr(w, "get_value", lambda: w.value)().dtype) == "float8_e4m3fn"
    assert_same_model(restored, direct)


def _copy(src, tmp_path):
    dst = str(tmp_path / "copy")
    shutil.copytree(src, dst)
    return dst


def test_incompatible_config_is_named(orbax_dir, tmp_path):
    ckpt = _copy(orbax_dir, tmp_path)
    with open(os.path.join(ckpt, "config.json")) as f:
        config = json.load(f)
    config["moe_intermediate_size"] = 48
    with open(os.path.join(ckpt, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(CheckpointError, match=r"mlp/down_proj/w was saved with shape \[3, 8, 32, 64\], config.json "
                                              r"implies \[3, 8, 48, 64\].*moe_intermediate_size=48 \(converted with 32\)"):
        load(ckpt, mesh="tp=2", dtype="float32")
    config["moe_intermediate_size"] = 32
    config["quantization_config"] = FP8_QUANT
    with open(os.path.join(ckpt, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(CheckpointError, match=r"config.json implies param .*/scale that the checkpoint lacks"):
        load(ckpt, dtype="float32")


def test_truncated_checkpoint_is_named(orbax_dir, tmp_path):
    ckpt = _copy(orbax_dir, tmp_path)
    with open(os.path.join(ckpt, META_FILE)) as f:
        files = json.load(f)["files"]
    data = sorted((size, rel) for rel, size in files.items() if "/d/" in rel)
    size, cut = data[-1]
    with open(os.path.join(ckpt, cut), "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(CheckpointError, match=rf"incomplete: {cut} has {size // 2} bytes, {size} were written"):
        load(ckpt, mesh="tp=2", dtype="float32")
    os.remove(os.path.join(ckpt, data[0][1]))
    with pytest.raises(CheckpointError, match=r"incomplete: .* \(and 1 more file problems\)"):
        load(ckpt, dtype="float32")
    os.remove(os.path.join(ckpt, META_FILE))
    with pytest.raises(CheckpointError, match=r"no qwen3_jax_orbax.json: the conversion did not finish"):
        load(ckpt, dtype="float32")


def test_refuses_to_overwrite(hf_dir, orbax_dir):
    from qwen3_jax.convert import convert
    with pytest.raises(FileExistsError, match="not empty; choose a new --out or pass --force"):
        convert(hf_dir, orbax_dir, progress=False)
    with pytest.raises(ValueError, match="already an Orbax checkpoint"):
        convert(orbax_dir, orbax_dir + "_again", progress=False)
    assert os.path.isdir(os.path.join(orbax_dir, PARAMS_DIR))
