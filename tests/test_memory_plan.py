"""The memory plan (sharding/memory.py, sharding/workspace.py, serve/dry_run.py).

- planned weight bytes per device equal what the loader places (its own shardings, per device,
  for every shipped preset; real arrays of random_model and load for a tiny model);
- the 235B-A22B scenario on 8 and 4 devices of 48 GiB, on paper;
- a tiny load never holds more than the plan on any device, sampled after every layer;
- the workspace does not grow with depth; the KV accounting equals a real cache's bytes;
- `python -m serve --dry-run` and `python -m serve.dry_run` (text, JSON, exit codes).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import require_reference
from reference import make_hf_checkpoint

import qwen3_jax
from qwen3_jax import api
from qwen3_jax.config import Qwen3MoeConfig, preset_names, resolve_config
from qwen3_jax.model import init_cache
from sharding.memory import (DEFAULT_MEM_FRACTION_STATIC, LoadMemoryProbe, format_sweep, kv_bytes_per_token, live_bytes_per_device,
                             plan_memory, sweep, weights_per_device)
from sharding.mesh import parse_mesh_spec, valid_specs
from sharding.workspace import workspace_by_depth

GiB = 2 ** 30
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Dense layer 2 (a second segment, dense_mlp), hidden 320 (a partial 128-block for FP8 scales).
TINY = dict(hidden_size=320, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
            moe_intermediate_size=384, intermediate_size=320, mlp_only_layers=[2])
TINY_LOADS = [("f32", "tp=2,ep=4"), ("f32", "dp=2,tp=2,ep=2"), ("fp8", ""), ("fp8", "tp=8")]


def loader_bytes_per_device(cfg, mesh, dtype="bfloat16") -> dict:
    """Bytes `qwen3_jax.load` places on each device: the loader's own abstract params and
    shardings (ctx.sharding(logical_axes)), and the per-device slices it reads for each
    (addressable_devices_indices_map, as api._from_lazy does)."""
    spec, ctx, kv_rep = api.build_context(cfg, mesh, devices=jax.devices())
    abstract = nnx.state(api.abstract_model(cfg, api.resolve_dtype(dtype), kv_rep, ctx))
    out: dict = {}
    for var in jax.tree.leaves(abstract, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        sharding = ctx.sharding(api.logical_axes(var))
        for device, index in sharding.addressable_devices_indices_map(tuple(var.shape)).items():
            n = math.prod(len(range(*s.indices(dim))) for s, dim in zip(index, var.shape))
            out[device] = out.get(device, 0) + n * np.dtype(var.dtype).itemsize
    return out


# -- weights: planned == placed -----------------------------------------------------------------

@pytest.mark.parametrize("preset", preset_names())
@pytest.mark.parametrize("mesh", ["tp=4,ep=8", "tp=8", "tp=2", "tp=8,ep=8"])
def test_preset_weights_equal_what_the_loader_places(preset, mesh):
    cfg = resolve_config(preset)
    spec = parse_mesh_spec(mesh)
    planned = weights_per_device(cfg, spec, "bfloat16")
    placed = loader_bytes_per_device(cfg, mesh)
    assert len(placed) == spec.num_devices
    assert set(placed.values()) == {sum(planned.values())}
    assert planned["other"] == 0  # every param has a component
    assert (planned["fp8_scales"] > 0) == preset.endswith("-FP8")


# Total parameters on the model cards (huggingface.co/Qwen/Qwen3-30B-A3B, /Qwen3-235B-A22B).
MODEL_CARD_PARAMS = {"Qwen3-30B-A3B": 30.5e9, "Qwen3-235B-A22B": 235e9}


@pytest.mark.parametrize("preset", sorted(MODEL_CARD_PARAMS))
def test_planned_weights_count_the_parameters_of_the_model_card(preset):
    """The planner's weight bytes on one device, in bf16, are 2 bytes per parameter of a count
    written out from the config here (not from the model code the planner shares with the
    loader), which rounds to the model card's total."""
    c = resolve_config(preset)
    d, q, e, f = c.hidden_size, c.head_dim, c.num_experts, c.moe_intermediate_size
    attention = d * q * (2 * c.num_attention_heads + 2 * c.num_key_value_heads) + 2 * q   # q, o, k, v; q/k norms
    moe = d * e + 3 * e * d * f                                                          # router, experts
    layer = attention + moe + 2 * d                                                      # + two RMSNorms
    total = c.num_hidden_layers * layer + 2 * c.vocab_size * d + d                       # embed, lm_head, final norm
    assert not c.mlp_only_layers and not c.tie_word_embeddings and not c.attention_bias
    assert sum(weights_per_device(c, parse_mesh_spec("tp=1"), "bfloat16").values()) == 2 * total
    assert total == pytest.approx(MODEL_CARD_PARAMS[preset], rel=0.002)


@pytest.fixture(scope="module")
def tiny_ckpts(tmp_path_factory):
    require_reference()
    from qwen3_jax.quantize import quantize_checkpoint

    root = tmp_path_factory.mktemp("memory_plan")
    bf = make_hf_checkpoint(str(root / "f32"), seed=7, **TINY)
    fp8 = str(root / "fp8")
    quantize_checkpoint(bf, fp8)
    return {"f32": bf, "fp8": fp8}


@pytest.mark.parametrize("kind,mesh", TINY_LOADS)
def test_tiny_load_never_exceeds_the_plan(tiny_ckpts, kind, mesh):
    path = tiny_ckpts[kind]
    cfg = Qwen3MoeConfig.from_json(path)
    plan = plan_memory(cfg, mesh, device_memory_bytes=GiB, context_length=256, workspace=False)
    samples = []

    def on_layer(done, total):
        probe(done, total)
        samples.append(live_bytes_per_device(probe.baseline))

    probe = LoadMemoryProbe()
    model = qwen3_jax.load(path, mesh=mesh, dtype="bfloat16", progress=False, on_layer=on_layer)
    # Sampled during the load (once per layer of every stacked weight), not only at the end.
    assert len(samples) >= cfg.num_hidden_layers and probe.samples == len(samples)
    assert max(max(s.values()) for s in samples) <= plan.weight_bytes
    assert probe.max_live_bytes <= plan.weight_bytes
    held = model.param_bytes_per_device()
    assert len(held) == plan.num_devices and set(held.values()) == {plan.weight_bytes}
    assert (plan.weights["fp8_scales"] > 0) == (kind == "fp8") and plan.weights["dense_mlp"] > 0


def test_tiny_random_model_holds_exactly_the_plan(tiny_ckpts):
    cfg = Qwen3MoeConfig.from_json(tiny_ckpts["fp8"])
    model = api.random_model(cfg, mesh="tp=2,ep=4", dtype="bfloat16")
    plan = plan_memory(cfg, "tp=2,ep=4", device_memory_bytes=GiB, context_length=256, workspace=False)
    assert set(model.param_bytes_per_device().values()) == {plan.weight_bytes}


@pytest.mark.parametrize("mesh", ["tp=2,ep=4", "tp=8", "dp=2,tp=2,ep=2"])
def test_kv_accounting_equals_a_real_cache(tiny_ckpts, mesh):
    cfg = Qwen3MoeConfig.from_json(tiny_ckpts["f32"])
    spec, ctx, kv_rep = api.build_context(cfg, mesh)
    slots, length = 3 * spec.dp, 40
    cache = init_cache(cfg, slots, length, jax.numpy.bfloat16, kv_rep, ctx)
    per_device: dict = {}
    for arr in jax.tree.leaves(cache):
        for shard in arr.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    # Each device holds its data group's slots: slots / dp of them, `length` tokens each.
    expected = (slots // spec.dp) * length * kv_bytes_per_token(cfg, spec, "bfloat16")
    assert len(per_device) == spec.num_devices and set(per_device.values()) == {expected}


# -- the scenario on paper: Qwen3-235B-A22B on 48 GiB devices ----------------------------------

@pytest.fixture(scope="module")
def fp8_235b():
    return resolve_config("Qwen3-235B-A22B-FP8")


@pytest.mark.parametrize("mesh", ["tp=4,ep=8", "tp=8,ep=8", "tp=8"])
def test_235b_fp8_fits_on_8_devices_of_48gib(fp8_235b, mesh):
    plan = plan_memory(fp8_235b, mesh, device_memory_bytes=48 * GiB)
    assert plan.num_devices == 8 and plan.fits, plan.format()
    assert 28 * GiB < plan.weight_bytes < 30 * GiB  # "about 30 GB"
    # References for two components, from the published shapes: 94 layers x E/8 local experts x
    # 3 matrices of 4096 x 1536 FP8 bytes; one token of K/V: 94 layers x 2 x 1 KV head x 128 x 2 bytes.
    assert plan.weights["experts"] == 94 * (128 // 8) * 3 * 4096 * 1536
    assert plan.kv_bytes_per_token == 94 * 2 * 1 * 128 * 2
    # The penalty counts: each slot's share of the vocabulary on a tensor-parallel device, int32.
    assert plan.sampler_bytes == plan.max_concurrent_requests * (151936 // plan.mesh.tp) * 4
    free = (int(48 * GiB * DEFAULT_MEM_FRACTION_STATIC) - plan.weight_bytes - plan.workspace_bytes
            - plan.sampler_bytes)
    assert plan.kv_cache_tokens == plan.mesh.dp * (free // plan.kv_bytes_per_token) > 50_000
    assert plan.max_concurrent_requests >= 1
    assert 0 < plan.workspace.prefill_bytes < 12 * GiB and 0 < plan.workspace.decode_bytes < 8 * GiB
    assert "verdict: fits" in plan.format()


def test_235b_fp8_on_4_devices_says_how_many_would_fit(fp8_235b):
    plan = plan_memory(fp8_235b, "tp=4,ep=4", device_memory_bytes=48 * GiB)
    assert not plan.fits and plan.num_devices == 4
    assert 55 * GiB < plan.weight_bytes < 60 * GiB  # "about 59 GB"
    assert plan.devices_needed() == 8
    text = plan.format()
    assert "does NOT fit" in text and "experts" in text
    assert any(s.startswith("8 devices instead of 4") for s in plan.suggestions()), plan.suggestions()


def test_235b_bf16_on_8_devices_suggests_fp8_or_two_nodes():
    plan = plan_memory(resolve_config("Qwen3-235B-A22B"), "tp=4,ep=8", device_memory_bytes=48 * GiB)
    assert not plan.fits
    assert 55 * GiB < plan.weight_bytes < 60 * GiB
    sugg = plan.suggestions()
    assert any(s.startswith("use the FP8 checkpoint Qwen3-235B-A22B-FP8") for s in sugg), sugg
    assert any(s.startswith("16 devices (two nodes of 8)") for s in sugg), sugg
    # Each suggestion was planned: the FP8 one is the FP8 preset's own plan on the same mesh.
    fp8 = plan_memory(resolve_config("Qwen3-235B-A22B-FP8"), "tp=4,ep=8", device_memory_bytes=48 * GiB)
    assert f"{fp8.kv_cache_tokens:,} KV tokens" in sugg[0]
    assert plan.to_json()["suggestions"] == sugg and plan.to_json()["fits"] is False


def test_auto_chunk_size_takes_2048_only_where_the_kv_cache_barely_notices(fp8_235b):
    """--chunked-prefill-size auto: 2048-token chunks on one 141 GB card for 30B-A3B-FP8 (a few %
    of the KV cache), 512 for 235B-A22B-FP8 on 8 x 48 GiB, where 2048 and 1024 would each cost
    more than AUTO_CHUNK_KV_COST of its KV cache (the README's worked example)."""
    from sharding.memory import AUTO_CHUNK_KV_COST, plan_memory_chunked

    roomy = plan_memory_chunked(resolve_config("Qwen3-30B-A3B-FP8"), "tp=1", device_memory_bytes=139 * GiB)
    base = roomy.replan(chunked_prefill_size=512)
    assert roomy.chunked_prefill_size == 2048 and roomy.workspace.prefill_tokens == 2048
    assert (1 - AUTO_CHUNK_KV_COST) * base.kv_cache_tokens <= roomy.kv_cache_tokens < base.kv_cache_tokens
    assert "chunked prefill: 2048 tokens (auto: its workspace costs" in roomy.format()
    assert roomy.to_json()["chunked_prefill_size"] == 2048
    tight = plan_memory_chunked(fp8_235b, "tp=4,ep=8", device_memory_bytes=48 * GiB)
    assert tight.chunked_prefill_size == 512 and tight.fits
    for size in (2048, 1024):
        assert tight.replan(chunked_prefill_size=size).kv_cache_tokens < (1 - AUTO_CHUNK_KV_COST) * tight.kv_cache_tokens
    assert "2048 or 1024-token chunks would cost over 10% of the KV cache" in tight.format()


def test_workspace_does_not_grow_with_depth(fp8_235b):
    """The claim the CPU compile settings rest on (sharding/workspace.py), at 235B-A22B-FP8 shapes."""
    ws = workspace_by_depth(fp8_235b, "tp=4,ep=8", layers=(2, 4), num_slots=8, context_length=8192,
                            prefill_tokens=512)
    assert abs(ws[2].prefill_bytes - ws[4].prefill_bytes) <= 4096
    assert abs(ws[2].decode_bytes - ws[4].decode_bytes) <= 4096
    assert ws[2].prefill_bytes > 2 ** 28  # real work is counted (scores, dequantized experts)


# -- sweep and the command line -----------------------------------------------------------------

def test_sweep_plans_every_valid_mesh(tiny_ckpts):
    cfg = Qwen3MoeConfig.from_json(tiny_ckpts["f32"])
    plans = sweep(cfg, 8, device_memory_bytes=64 * 2 ** 20, context_length=256, workspace=False)
    assert [p.mesh for p in plans] == valid_specs(cfg, 8)
    for p in plans:
        one = plan_memory(cfg, p.mesh, device_memory_bytes=64 * 2 ** 20, context_length=256, workspace=False)
        assert (p.weight_bytes, p.kv_cache_tokens, p.fits) == (one.weight_bytes, one.kv_cache_tokens, one.fits)
    table = format_sweep(plans)
    assert len(table.splitlines()) == 3 + len(plans)


def _cli(*args, module="serve"):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["PYTHONPATH"] = ROOT
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=600)


@pytest.fixture(scope="module")
def config_only_dir(tiny_ckpts, tmp_path_factory):
    """A checkpoint directory with nothing but config.json: all a dry run needs."""
    d = tmp_path_factory.mktemp("config_only")
    with open(os.path.join(tiny_ckpts["fp8"], "config.json")) as f, open(d / "config.json", "w") as g:
        g.write(f.read())
    return str(d)


def test_dry_run_json_fits_and_matches_the_planner(config_only_dir):
    r = _cli("--model", config_only_dir, "--mesh", "tp=2,ep=4", "--device-memory", "64MiB",
             "--context-length", "256", "--dry-run", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    cfg = Qwen3MoeConfig.from_json(config_only_dir)
    plan = plan_memory(cfg, "tp=2,ep=4", device_memory_bytes=64 * 2 ** 20, context_length=256,
                       mem_fraction_static=out["per_device"]["mem_fraction_static"], workspace=False)
    assert out["fits"] is True and out["num_devices"] == 4
    assert out["per_device"]["weights_bytes"] == {k: v for k, v in plan.weights.items() if v}
    assert out["per_device"]["limit_bytes"] == 64 * 2 ** 20
    ws = out["per_device"]["workspace"]
    assert ws["platform"] == "cpu" and ws["prefill_bytes"] > 0 and ws["decode_bytes"] > 0
    assert "serve engine steps" in ws["compiled_as"]
    assert out["kv_cache_tokens"] > 0 and out["per_device"]["total_bytes"] <= 64 * 2 ** 20


def test_dry_run_text_and_exit_codes(config_only_dir, capsys):
    """In-process (JAX is already up with 8 CPU devices): not fitting is 1, bad arguments 2."""
    from serve import dry_run

    rc = dry_run.main(["--model", config_only_dir, "--mesh", "tp=2", "--device-memory", "4MiB",
                       "--context-length", "256"])
    out = capsys.readouterr().out
    assert rc == 1 and "verdict: does NOT fit: the weights alone are 3.77 MiB per device" in out, out
    assert dry_run.main(["--model", config_only_dir, "--mesh", "tp=3", "--device-memory", "1GB"]) == 2
    assert "tp=3" in capsys.readouterr().err
    assert dry_run.main(["--model", config_only_dir, "--device-memory", "48 gigs"]) == 2
    assert "--device-memory" in capsys.readouterr().err
    assert dry_run.main(["--model", config_only_dir]) == 2
    assert "needs --device-memory" in capsys.readouterr().err
    assert dry_run.parse_memory("48GiB") == 48 * GiB and dry_run.parse_memory("80GB") == 80 * 10 ** 9


def test_measure_model_memory_reports_held_next_to_planned(tiny_ckpts):
    from sharding.memory import measure_model_memory

    m = measure_model_memory(tiny_ckpts["fp8"], "tp=2,ep=4")
    assert set(m["held_param_bytes"].values()) == {m["planned_weight_bytes"]}
    assert 0 < max(m["max_live_bytes_during_load"].values()) <= m["planned_weight_bytes"]
    assert len(m["after"]) == 4 and all(d["live_array_bytes"] >= m["planned_weight_bytes"] for d in m["after"])
    assert "planned weights per device" in m["report"]


@pytest.mark.parametrize("preset,mesh,gapped", [
    ("Qwen3-30B-A3B-FP8", "ep=4", {"experts"}), ("Qwen3-30B-A3B-FP8", "tp=4", {"experts"}),
    ("Qwen3-30B-A3B-FP8", "ep=2", set()), ("Qwen3-30B-A3B-FP8", "ep=8", set()),
    ("Qwen3-30B-A3B", "ep=4", set()),   # bf16: two-byte elements, never in the gap
    ("Qwen3-235B-A22B-FP8", "tp=4,ep=8", set()), ("Qwen3-235B-A22B-FP8", "ep=32", {"attention", "experts"})])
def test_plan_says_which_fp8_weights_fall_in_the_kernels_index_gap(preset, mesh, gapped, monkeypatch):
    """FP8 weights whose per-device shard is 2-4 GiB (Pallas indexes them with int32 offsets) get
    int64 offsets (kernels/index_width.py), so the plan says nothing of them. Where this jax's
    lowering cannot be widened (WIDEN off stands for that) they run on XLA and the plan says so
    before anything is allocated, with the way out, in its text and JSON. 30B-A3B's experts are
    2.25 GiB per device at ep=4 and tp=4."""
    from qwen3_jax.kernels import index_width

    def notes():
        plan = plan_memory(resolve_config(preset), mesh, device_memory_bytes=141 * GiB, workspace=False)
        assert plan.to_json()["notes"] == plan.notes
        return plan
    assert index_width.widened() and notes().notes == []
    monkeypatch.setattr(index_width, "WIDEN", False)
    plan = notes()
    assert {note.split("(")[1].split(")")[0] for note in plan.notes} == gapped
    for note in plan.notes:
        assert note in plan.format() and "another ep or tp" in note and "GiB of FP8 each per device" in note