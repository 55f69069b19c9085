"""Qwen's block-FP8 checkpoints: written by `python -m qwen3_jax.quantize`, loaded FP8 on devices.

A tiny transformers Qwen3-MoE whose dims end in partial 128-blocks (hidden and dense
intermediate 320 = 2.5 blocks; expert intermediate 384, split 192 per device at tp=2 as
Qwen3-30B-A3B's 768 is at tp=4) is quantized with the tool. The exact reference
for FP8 inference is transformers running the *dequantized* weights (weight * scale_inv, block
by block) in float32: our FP8 logits must match it to 1e-5. Against the original unquantized
model the FP8 error is reported and bounded. Meshes (including shards that cut 128-blocks),
device bytes, bf16 / float32 scales, modules_to_not_convert and corrupt checkpoints are checked.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tracemalloc

import jax
import ml_dtypes
import numpy as np
import pytest

from conftest import require_reference
from reference import hf_logits, hf_model, make_hf_checkpoint, rel_err

import qwen3_jax
from qwen3_jax.fp8 import FP8_MAX, dequantize, dequantize_blocks, kind_kept_unquantized, module_kept_unquantized
from qwen3_jax.quantize import dequantize_checkpoint, quantization_config, quantize_checkpoint
from qwen3_jax.quantize import main as quantize_main
from qwen3_jax.safetensors_io import CheckpointError, SafetensorsCheckpoint, write_safetensors

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# MoE layers 0-1 (one stacked segment), dense layer 2. D=320 and I=320 end in a partial block.
FP8_TINY = dict(hidden_size=320, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                moe_intermediate_size=384, intermediate_size=320, mlp_only_layers=[2])
BF16, FP8 = np.dtype(ml_dtypes.bfloat16), np.dtype(ml_dtypes.float8_e4m3fn)
SIDE_FILES = {"tokenizer.json": '{"version": "1.0"}', "tokenizer_config.json": '{"model_max_length": 256}',
              "chat_template.jinja": "{{ messages }}"}
TOL = 1e-5


def _tokens(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 128, shape)


def _quantize_cli(src, out, *extra):
    """The documented command, as a user runs it."""
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-m", "qwen3_jax.quantize", "--model", src, "--out", out,
                        "--no-progress", *extra], capture_output=True, text=True, env=env, cwd=REPO)
    return r


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Directories: orig (float32), fp8 (float32 scales, 3 shards), fp8_bf16 (bf16 scales), deq (dequantized)."""
    require_reference()
    root = tmp_path_factory.mktemp("fp8")
    orig = make_hf_checkpoint(str(root / "orig"), seed=4, **FP8_TINY)
    for name, text in SIDE_FILES.items():
        with open(os.path.join(orig, name), "w") as f:
            f.write(text)
    d = {"orig": orig, "fp8": str(root / "fp8"), "fp8_bf16": str(root / "fp8_bf16"), "deq": str(root / "deq")}
    r = _quantize_cli(orig, d["fp8"], "--max-shard-size", "1.5MB")
    assert r.returncode == 0, r.stderr
    d["cli_output"] = r.stdout
    quantize_checkpoint(orig, d["fp8_bf16"], scale_dtype="bfloat16")
    # Again, measured (numpy reports its buffers to tracemalloc; the FP8 cast is compiled by now).
    tracemalloc.start()
    quantize_checkpoint(orig, str(root / "fp8_measured"))
    d["quantize_peak_bytes"] = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    dequantize_checkpoint(d["fp8"], d["deq"])
    return d


@pytest.fixture(scope="module", autouse=True)
def _release_models():
    yield
    _MODELS.clear()


@pytest.fixture(scope="module")
def fp8_single(ckpts):
    return qwen3_jax.load(ckpts["fp8"], dtype="float32", progress=False)


# -- the tool's output ------------------------------------------------------------------------

def test_quantized_checkpoint_has_qwens_layout(ckpts):
    out, orig = SafetensorsCheckpoint(ckpts["fp8"]), SafetensorsCheckpoint(ckpts["orig"])
    print(ckpts["cli_output"])
    assert "FP8" in ckpts["cli_output"]
    with open(os.path.join(ckpts["fp8"], "config.json")) as f:
        cfg = json.load(f)
    assert cfg["quantization_config"] == {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                          "weight_block_size": [128, 128]}
    assert cfg["dtype"] == "bfloat16"
    for name in list(SIDE_FILES) + ["generation_config.json"]:
        with open(os.path.join(ckpts["orig"], name)) as a, open(os.path.join(ckpts["fp8"], name)) as b:
            assert a.read() == b.read(), name
    # Sharded: an index whose weight_map covers every tensor and names more than one file.
    with open(os.path.join(ckpts["fp8"], "model.safetensors.index.json")) as f:
        index = json.load(f)
    assert len(set(index["weight_map"].values())) >= 2
    assert set(index["weight_map"]) == set(out.keys())
    quant = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(experts\.\d+\.)?(gate|up|down)_proj)\.weight$")
    n_fp8 = 0
    for name in orig.keys():
        shape = orig.shape(name)
        assert out.shape(name) == shape
        if not quant.match(name):  # router, norms, embeddings, lm_head: bf16, no scale
            assert out.dtype(name) == BF16 and name + "_scale_inv" not in out, name
            np.testing.assert_array_equal(out.array(name), orig.array(name).astype(BF16))
            continue
        n_fp8 += 1
        w8, s = out.array(name), out.array(name + "_scale_inv")
        assert out.dtype(name) == FP8 and out.dtype(name + "_scale_inv") == np.float32
        assert s.shape == (-(-shape[0] // 128), -(-shape[1] // 128)), name
        # scale_inv = block amax / 448, partial edge blocks included; the dequantized weight is
        # within FP8's half-ulp (1/16 relative at the top of the block's range) of the original.
        w = orig.array(name).astype(np.float32)
        for i in range(s.shape[0]):
            for j in range(s.shape[1]):
                tile = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
                assert s[i, j] == pytest.approx(np.abs(tile).max() / FP8_MAX, rel=1e-6)
        err = np.abs(dequantize_blocks(w8, s, (128, 128)) - w)
        assert (err <= np.repeat(np.repeat(s, 128, 0), 128, 1)[: shape[0], : shape[1]] * 16 + 1e-12).all()
    assert n_fp8 == 2 * (4 + 8 * 3) + (4 + 3)  # 2 MoE layers, 1 dense


@pytest.mark.parametrize("out_dim,in_dim", [(256, 384), (200, 300)])
def test_in_graph_dequantize_equals_the_host_one(out_dim, in_dim):
    """fp8.dequantize (the model's in-graph form: the scale broadcast over the split block axis, a
    partial edge block padded first) equals dequantize_blocks on the host, bit for bit,
    along either axis of a [out, in] weight and with a leading layer axis (a negative block axis)."""
    rng = np.random.default_rng(5)
    w8 = rng.standard_normal((out_dim, in_dim)).astype(ml_dtypes.float8_e4m3fn)
    s = rng.uniform(0.01, 0.03, (-(-out_dim // 128), -(-in_dim // 128))).astype(np.float32)
    want = dequantize_blocks(w8, s, (128, 128))
    # the in-graph scale has one block axis: expand the other on the host first
    s_out = np.repeat(s, 128, 1)[:, :in_dim]           # [ceil(out/128), in], blocks along out
    s_in = np.repeat(s, 128, 0)[:out_dim]              # [out, ceil(in/128)], blocks along in
    np.testing.assert_array_equal(np.asarray(dequantize(w8, s_out, 0, 128, np.float32)), want)
    np.testing.assert_array_equal(np.asarray(dequantize(w8, s_in, 1, 128, np.float32)), want)
    stacked = np.asarray(dequantize(np.stack([w8, w8]), np.stack([s_in, 2 * s_in]), -1, 128, np.float32))
    np.testing.assert_array_equal(stacked[0], want)
    np.testing.assert_array_equal(stacked[1], 2 * want)


def test_quantize_memory_is_one_tensor_not_the_checkpoint(ckpts):
    """Tensor by tensor from the memory map into pre-sized shard files: the host memory the tool
    allocates (numpy buffers, via tracemalloc) stays a few times the largest tensor."""
    orig = SafetensorsCheckpoint(ckpts["orig"])
    sizes = [orig.array(n).nbytes for n in orig.keys()]
    peak = ckpts["quantize_peak_bytes"]
    print(f"quantize: peak {peak / 1e6:.2f} MB allocated for a {sum(sizes) / 1e6:.1f} MB checkpoint "
          f"(largest tensor {max(sizes) / 1e6:.2f} MB)")
    assert peak < 6 * max(sizes) and peak < sum(sizes) / 5


def test_safetensors_library_reads_the_output(ckpts):
    """The files are standard safetensors: the reference reader returns the same bytes."""
    require_reference()
    import torch
    from safetensors import safe_open

    ours = SafetensorsCheckpoint(ckpts["fp8"])
    for fname in sorted({ours.file_of(n) for n in ours.keys()}):
        with safe_open(os.path.join(ckpts["fp8"], fname), "pt") as f:
            assert f.metadata() == {"format": "pt"}
            for name in f.keys():
                raw = f.get_tensor(name).reshape(-1).view(torch.uint8).numpy()
                np.testing.assert_array_equal(raw, np.ascontiguousarray(ours.array(name)).reshape(-1).view(np.uint8))
                assert str(f.get_slice(name).get_dtype()) == {FP8: "F8_E4M3", BF16: "BF16"}.get(
                    ours.dtype(name), "F32"), name


def test_quantize_refuses_an_fp8_input(ckpts, tmp_path, capsys):
    assert quantize_main(["--model", ckpts["fp8"], "--out", str(tmp_path / "again"), "--no-progress"]) == 2
    assert "already has a quantization_config" in capsys.readouterr().err


# -- numerics ---------------------------------------------------------------------------------

def test_fp8_logits_match_transformers_on_dequantized_weights(ckpts, fp8_single):
    tokens = _tokens((4, 32), seed=1)
    ours = fp8_single.logits(tokens)
    dequantized = hf_logits(hf_model(ckpts["deq"]), tokens)
    err = rel_err(ours, dequantized)
    print(f"FP8 (ours) vs transformers on the dequantized weights, float32: rel err {err:.2e}")
    assert err <= TOL

    original = hf_logits(hf_model(ckpts["orig"]), tokens)
    err_q = rel_err(ours, original)
    rms = float(np.sqrt(np.mean((ours - original) ** 2) / np.mean(original ** 2)))
    top1 = float((ours.argmax(-1) == original.argmax(-1)).mean())
    top1_deq = float((dequantized.argmax(-1) == original.argmax(-1)).mean())
    print(f"FP8 vs the unquantized model: max rel err {err_q:.3f}, rms rel err {rms:.3f}, "
          f"top-1 agreement {top1:.3f} over {tokens.size} positions (transformers on dequantized: {top1_deq:.3f})")
    # e4m3 keeps 3 mantissa bits: 3-6% error per weight. This random 3-layer model is that sensitive:
    # multiplying its weights by independent uniform(1 - 2^-5, 1 + 2^-5) factors gave rms 0.156,
    # top-1 0.83 (routing flips included), about what FP8 gives; a wrong scale would be far off.
    assert rms < 0.25 and top1 >= 0.7


def test_expert_storage_orders_give_the_same_logits(ckpts, monkeypatch, xla_optimized):
    """FP8 experts and attention weights stored [out, in] (fp8.NK_ORDER, the default) or in the einsum order: the
    loader reads the same checkpoint into either and the kernels (interpret mode here) agree to
    bf16 rounding: each order has its own gemv tiles, so float32 sums run in another order
    (measured 6.4e-3 here; a weight read in the wrong order is off by O(1)). The XLA path with the
    default order is checked against transformers above."""
    from qwen3_jax import fp8, kernels
    tokens = _tokens((2, 6), seed=7)
    out = {}
    for nk in (True, False):
        monkeypatch.setattr(fp8, "NK_ORDER", nk)
        m = qwen3_jax.load(ckpts["fp8"], dtype="bfloat16", progress=False)
        w = m.state["segments"][0]["block"]["mlp"]["down_proj"]["w"].get_value()
        assert w.shape[-2:] == ((FP8_TINY["hidden_size"], FP8_TINY["moe_intermediate_size"]) if nk else
                                (FP8_TINY["moe_intermediate_size"], FP8_TINY["hidden_size"]))
        with kernels.kernels_enabled(True):
            out[nk] = m.logits(tokens)
    print("storage orders rel err", rel_err(out[True], out[False]))
    assert rel_err(out[True], out[False]) < 2e-2


def test_bf16_and_float32_scales_load_the_same(ckpts, tmp_path):
    """Scales stored bf16 load; the same bf16-exact values stored float32 give identical logits."""
    src = SafetensorsCheckpoint(ckpts["fp8_bf16"])
    scales = [n for n in src.keys() if n.endswith("_scale_inv")]
    assert scales and all(src.dtype(n) == BF16 for n in scales)
    as_f32 = str(tmp_path / "bf16_scales_as_f32")
    os.makedirs(as_f32)
    tensors = {n: (src.array(n).astype(np.float32) if n in scales else src.array(n)) for n in src.keys()}
    write_safetensors(os.path.join(as_f32, "model.safetensors"), tensors, {"format": "pt"})
    shutil.copy(os.path.join(ckpts["fp8_bf16"], "config.json"), as_f32)

    tokens = _tokens((2, 16), seed=2)
    model_bf16 = qwen3_jax.load(ckpts["fp8_bf16"], dtype="float32", progress=False)
    a = model_bf16.logits(tokens)
    b = qwen3_jax.load(as_f32, dtype="float32", progress=False).logits(tokens)
    np.testing.assert_array_equal(a, b)
    # The device scale is the checkpoint's bf16 value, widened exactly: expert 5's gate_proj,
    # scale [E, D/128, F] per element of F (F rows of the HF [F, D] weight, in 128-row blocks).
    hf = src.array("model.layers.1.mlp.experts.5.gate_proj.weight_scale_inv").astype(np.float32)  # [3, 3]
    dev = np.asarray(model_bf16.state["segments"][0]["block"]["mlp"]["gate_proj"]["scale"].get_value())[1, 5]
    np.testing.assert_array_equal(dev, np.repeat(hf, 128, axis=0)[:384].T)


# -- meshes -----------------------------------------------------------------------------------

# Expert F=384 split 2 ways (tp=2: 192-wide shards, 1.5 blocks, Qwen3-30B-A3B's shape at tp=4,
# which SGLang and vLLM refuse) or 4 ways (96-wide); dense I=320 split 2/4 ways (160/80-wide).
# Every one of those shards cuts a 128-block. EP meshes with and without expert-tensor splits.
MESHES = {"tp=2": (2, 192), "tp=4": (4, 96), "tp=2,ep=4": (1, 384), "tp=4,ep=8": (1, 384), "tp=4,ep=2": (2, 192)}
_MODELS: dict = {}


def _load_fp8(ckpts, mesh, dtype="float32"):
    """The FP8 checkpoint under `mesh`, loaded once per module run."""
    key = (ckpts["fp8"], mesh, dtype)
    if key not in _MODELS:
        _MODELS[key] = qwen3_jax.load(ckpts["fp8"], mesh=mesh, dtype=dtype, progress=False)
    return _MODELS[key]


def _param(model, *path):
    node = model.state
    for k in path:
        node = node[k]
    return node.get_value()


@pytest.mark.parametrize("mesh", list(MESHES))
def test_fp8_under_mesh_equals_one_device(ckpts, fp8_single, mesh):
    tokens = _tokens((3, 10), seed=3)
    sharded = _load_fp8(ckpts, mesh)
    experts = sharded.config.num_experts // sharded.mesh_spec.ep
    split, width = MESHES[mesh]
    assert sharded.mesh_spec.etp == split
    # Expert gate W stays FP8, stored [L, E, F, D] (the checkpoint's [out, in]) with 192- or 96-wide
    # F shards; its scale [L, E, D/128, F] (einsum order) is split exactly like it (D, never split,
    # is the dim held in blocks).
    w = _param(sharded, "segments", 0, "block", "mlp", "gate_proj", "w")
    scale = _param(sharded, "segments", 0, "block", "mlp", "gate_proj", "scale")
    assert w.dtype == FP8 and scale.dtype == np.float32
    assert {sh.data.shape for sh in w.addressable_shards} == {(2, experts, width, 320)}
    assert {sh.data.shape for sh in scale.addressable_shards} == {(2, experts, 3, width)}
    w_spec = tuple(w.sharding.spec) + (None,) * (4 - len(w.sharding.spec))
    s_spec = tuple(scale.sharding.spec) + (None,) * (4 - len(scale.sharding.spec))
    assert s_spec == (*w_spec[:2], w_spec[3], w_spec[2])
    err = rel_err(sharded.logits(tokens), fp8_single.logits(tokens))
    print(f"{mesh}: {sharded.mesh_spec.describe()}, expert F shards {width} wide, rel err vs one device {err:.2e}")
    assert err <= TOL


# -- device memory ----------------------------------------------------------------------------

QUANTIZED = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def _device_bytes(arrays, device) -> int:
    return sum(sh.data.nbytes for a in arrays for sh in a.addressable_shards if sh.device == device)


def _bf16_bytes_per_device(cfg, mesh, device, pick) -> int:
    """Bytes the bf16 model holds on `device`: its abstract params' shards under the same mesh."""
    import dataclasses

    from flax import nnx

    from qwen3_jax.api import abstract_model, build_context, logical_axes

    plain = dataclasses.replace(cfg, fp8=None)
    _, ctx, kv_rep = build_context(plain, mesh)
    _, abstract = nnx.split(abstract_model(plain, np.dtype(BF16), kv_rep, ctx))
    total = 0
    for path, var in abstract.flat_state():
        if pick(path):
            index = ctx.sharding(logical_axes(var)).devices_indices_map(var.shape)[device]
            total += int(np.prod([len(range(*sl.indices(n))) for sl, n in zip(index, var.shape)])) * BF16.itemsize
    return total


def test_device_bytes_fp8_weight_plus_scale(ckpts):
    mesh = "tp=2,ep=4"
    model = _load_fp8(ckpts, mesh, dtype="bfloat16")
    seen = set()
    for path, var in model.state.flat_state():
        arr = var.get_value()
        if path[0] == "segments" and path[-2] in QUANTIZED:
            assert arr.dtype == (FP8 if path[-1] == "w" else np.float32), path
            seen.add((path[-2], path[-1]))
        else:
            assert arr.dtype == BF16, path  # router, norms, embeddings, lm_head
    assert seen == {(m, leaf) for m in QUANTIZED for leaf in ("w", "scale")}

    def experts(path):
        return path[0] == "segments" and path[1] == 0 and path[-2] in ("gate_proj", "up_proj", "down_proj")

    def everything(path):
        return True

    state = dict(model.state.flat_state())
    device = jax.devices()[0]
    fp8_experts = _device_bytes([v.get_value() for p, v in state.items() if experts(p)], device)
    fp8_all = _device_bytes([v.get_value() for v in state.values()], device)
    bf16_experts = _bf16_bytes_per_device(model.config, mesh, device, experts)
    bf16_all = _bf16_bytes_per_device(model.config, mesh, device, everything)
    ratio, whole = fp8_experts / bf16_experts, fp8_all / bf16_all
    print(f"{mesh}, {device}: expert weights {fp8_experts} B FP8+scale vs {bf16_experts} B bf16 = {ratio:.4f}; "
          f"all params {fp8_all} vs {bf16_all} B = {whole:.4f}")
    # 1 byte + one float32 per 128 along D (3 blocks of D=320: 12 bytes per 320) vs 2 bytes.
    assert ratio == pytest.approx((1 + 3 * 4 / 320) / 2, rel=1e-9)
    assert ratio < 0.6 and whole < 0.65


# -- modules_to_not_convert -------------------------------------------------------------------

KEEP = ["model.layers.0.self_attn.q_proj", "o_proj", "model.layers.1.mlp.experts"]


def test_modules_to_not_convert_follows_transformers_rule():
    require_reference()
    from transformers.quantizers.quantizers_utils import should_convert_module

    names = ["model.layers.1.self_attn.q_proj", "model.layers.11.self_attn.q_proj", "model.layers.0.mlp.gate",
             "model.layers.0.mlp.gate_proj", "model.layers.3.mlp.experts.7.up_proj", "lm_head",
             "model.layers.2.self_attn.o_proj"]
    patterns = [["model.layers.1"], ["mlp.gate"], ["o_proj"], ["model.layers.*.mlp.experts"], ["lm_head"],
                ["model.layers.3.mlp.experts.7"], ["self_attn.q_proj", "model.layers.0.mlp.gate"]]
    for p in patterns:
        for n in names:
            assert module_kept_unquantized(n, p) == (not should_convert_module(n, p)), (n, p)


def test_modules_to_not_convert_honoured(ckpts, tmp_path):
    out = str(tmp_path / "mixed")
    quantize_checkpoint(ckpts["orig"], out, keep_unquantized=KEEP)
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["quantization_config"] == quantization_config(KEEP)
    ck = SafetensorsCheckpoint(out)
    for name, want in [("model.layers.0.self_attn.q_proj.weight", BF16), ("model.layers.1.self_attn.q_proj.weight", FP8),
                       ("model.layers.2.self_attn.o_proj.weight", BF16), ("model.layers.1.mlp.experts.5.up_proj.weight", BF16),
                       ("model.layers.0.mlp.experts.5.up_proj.weight", FP8), ("model.layers.2.mlp.up_proj.weight", FP8)]:
        assert ck.dtype(name) == want, name
        assert (name + "_scale_inv" in ck) == (want == FP8), name

    model = qwen3_jax.load(out, dtype="float32", progress=False)
    cfg = model.config
    kept = {k: kind_kept_unquantized(cfg, k) for k in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj",
                                                       "mlp.experts.up_proj", "mlp.up_proj")}
    assert kept == {"self_attn.q_proj": True, "self_attn.k_proj": False, "self_attn.o_proj": True,
                    "mlp.experts.up_proj": True, "mlp.up_proj": False}
    attn = model.state["segments"][0]["block"]["attn"]
    assert _param(model, "segments", 0, "block", "attn", "q_proj", "w").dtype == np.float32
    assert "scale" not in attn["q_proj"]
    assert _param(model, "segments", 0, "block", "attn", "k_proj", "w").dtype == FP8
    assert _param(model, "segments", 0, "block", "mlp", "up_proj", "w").dtype == np.float32
    assert _param(model, "segments", 1, "block", "mlp", "up_proj", "w").dtype == FP8  # dense layer 2

    deq = str(tmp_path / "mixed_deq")
    dequantize_checkpoint(out, deq)
    tokens = _tokens((2, 16), seed=6)
    err = rel_err(model.logits(tokens), hf_logits(hf_model(deq), tokens))
    print(f"modules_to_not_convert {KEEP}: rel err vs transformers on the dequantized weights {err:.2e}")
    assert err <= TOL


# -- corrupt checkpoints ----------------------------------------------------------------------

def _corrupt(ckpts, tmp_path, edit, config_edit=None):
    src = SafetensorsCheckpoint(ckpts["fp8"])
    tensors = {n: np.array(src.array(n)) for n in src.keys()}
    edit(tensors)
    out = str(tmp_path / "corrupt")
    os.makedirs(out)
    write_safetensors(os.path.join(out, "model.safetensors"), tensors, {"format": "pt"})
    with open(os.path.join(ckpts["fp8"], "config.json")) as f:
        cfg = json.load(f)
    if config_edit:
        config_edit(cfg)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f)
    return out


def _dequantized(t, name):
    return dequantize_blocks(t[name], t[name + "_scale_inv"], (128, 128)).astype(BF16)


EXPERT = "model.layers.0.mlp.experts.3.gate_proj.weight"
CORRUPTIONS = {
    "scale_shape": (lambda t: t.update({EXPERT + "_scale_inv": np.ones((1, 3), np.float32)}),
                    None, EXPERT + "_scale_inv", r"has shape \[1, 3\], expected \[3, 3\]"),
    "scale_missing": (lambda t: t.pop("model.layers.2.self_attn.k_proj.weight_scale_inv"),
                      None, "model.layers.2.self_attn.k_proj.weight", "has no .*_scale_inv"),
    "scale_dtype": (lambda t: t.update({EXPERT + "_scale_inv": t[EXPERT + "_scale_inv"].astype(np.float16)}),
                    None, EXPERT + "_scale_inv", "has dtype float16; expected float32 or bfloat16"),
    "weight_not_fp8_with_scale": (lambda t: t.update({EXPERT: _dequantized(t, EXPERT)}),
                                  None, EXPERT, "has a scale but is bfloat16"),
    "weight_bf16_no_scale": (lambda t: t.update({EXPERT: _dequantized(t, EXPERT)}) or t.pop(EXPERT + "_scale_inv"),
                             None, EXPERT, "bfloat16 with no weight_scale_inv.*modules_to_not_convert"),
    "fp8_without_quantization_config": (lambda t: None, lambda c: c.pop("quantization_config"),
                                        "model.layers.0.mlp.experts.0.down_proj.weight",
                                        "FP8 but config.json has no quantization_config"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupt_fp8_checkpoint_names_the_tensor(ckpts, tmp_path, case):
    edit, config_edit, tensor, message = CORRUPTIONS[case]
    path = _corrupt(ckpts, tmp_path, edit, config_edit)
    with pytest.raises(CheckpointError) as e:
        qwen3_jax.load(path, dtype="float32", progress=False)
    text = str(e.value)
    print(f"{case}: {text}")
    assert re.search(rf"\b{re.escape(tensor)}\b in model\.safetensors", text), text
    assert re.search(message, text), text


# -- transformers' own FP8 loading ------------------------------------------------------------

def test_transformers_loads_the_fp8_checkpoint(tmp_path):
    """transformers' from_pretrained of the tool's output. On CPU transformers dequantizes FP8 on
    load (it needs accelerate); its dequantizer assumes every block is full, so this checkpoint
    uses dims that are multiples of 128."""
    require_reference()
    try:
        import accelerate  # noqa: F401
    except ImportError as e:
        if os.environ.get("QWEN3_JAX_REQUIRE_REFERENCE") == "1":
            pytest.fail(f"transformers' FP8 loading needs accelerate (pip install accelerate): {e}")
        pytest.skip("accelerate not installed: transformers cannot load FP8 checkpoints without it")
    import torch
    from transformers import Qwen3MoeForCausalLM

    orig = make_hf_checkpoint(str(tmp_path / "orig"), seed=7, hidden_size=256, moe_intermediate_size=256,
                              intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                              num_hidden_layers=2, mlp_only_layers=[1])
    fp8 = str(tmp_path / "fp8")
    quantize_checkpoint(orig, fp8)
    tokens = _tokens((2, 12), seed=8)
    hf = Qwen3MoeForCausalLM.from_pretrained(fp8, dtype=torch.float32, attn_implementation="eager").eval()
    theirs = hf_logits(hf, tokens)
    ours = qwen3_jax.load(fp8, dtype="float32", progress=False).logits(tokens)
    err = rel_err(ours, theirs)
    print(f"ours (FP8 on device) vs transformers from_pretrained(FP8 checkpoint): rel err {err:.2e}")
    assert err <= TOL
