"""serve.bench on CPU with the tiny config: it runs, and its floors are the arithmetic they claim;
benchmarks/prefix_cache.py, benchmarks/chunked_prefill.py and benchmarks/prompt_ttft.py run too,
and benchmarks/kernel_registers.py's lowering."""

import json

import numpy as np
import pytest

from serve import bench


@pytest.mark.parametrize("batch", [1, 8, 64])
def test_expected_touched_experts_matches_simulated_uniform_routing(batch):
    rng = np.random.default_rng(batch)
    e, k, trials = 128, 8, 4000
    touched = [len(np.unique(np.argsort(rng.random((batch, e)), axis=1)[:, :k])) for _ in range(trials)]
    want = e * bench.expected_touched_fraction(batch, e, k)
    assert abs(np.mean(touched) - want) < 0.02 * want
    assert bench.expected_touched_fraction(1, e, k) == pytest.approx(k / e)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "results.json"
    res = bench.main(["--model", "tiny", "--batch", "1,3", "--context", "16", "--prefill", "8", "--steps", "2",
                      "--reps", "1", "--single-step", "", "--out", str(out), "--markdown",
                      "--dump-hlo", str(out.parent / "hlo")])
    return res, out


def test_dump_hlo_writes_each_decode_step_and_prefill(tiny_run):
    """--dump-hlo: the optimized HLO of every timed decode batch and prefill length (where the
    profile's fusion names are defined), in a folder named after the variant's label."""
    _, out = tiny_run
    assert [p.name for p in (out.parent / "hlo").iterdir()] == ["off"]   # CPU: kernels off, no knobs
    folder = out.parent / "hlo" / "off"
    files = sorted(p.name for p in folder.iterdir())
    assert files == ["decode_bf16_b1.hlo.txt", "decode_bf16_b3.hlo.txt", "prefill_bf16_8.hlo.txt"]
    assert all((folder / f).read_text().startswith("HloModule") for f in files)


def test_tiny_bench_reports_every_figure_next_to_its_floor(tiny_run, capsys):
    res, out = tiny_run
    saved = json.loads(out.read_text())
    assert saved["config"]["name"] == "tiny" and saved["context"] == 16
    c = res["ceilings"]
    assert c["bandwidth"] > 0 and c["matmul_flops"] > 0
    assert [r["batch"] for r in res["decode"]] == [1, 3]
    for r in res["decode"]:
        assert r["step_ms"] > 0 and r["tok_s"] == pytest.approx(r["batch"] * 1e3 / r["step_ms"])
        assert r["pct_floor"] == pytest.approx(100 * r["floor_ms"] / r["step_ms"])
        assert r["kernels"] == "off"   # CPU: the plain-XLA reference path
    (p,) = res["prefill"]
    assert p["tokens"] == 8 and p["tok_s"] == pytest.approx(8e3 / p["ms"])
    assert res["create_s"] > 0 and res["first_compile_s"] > 0


def test_idle_slots_ride_along_as_in_the_engine(tiny_run, capsys):
    """--idle-slots 2: the batch-1 step carries 2 more cache rows parked past the cache (the
    engine's free slots), kernels on (interpret mode): the floor and tok/s count the live row
    only, and the table says so."""
    res = bench.main(["--model", "tiny", "--batch", "1", "--context", "16", "--prefill=", "--steps", "2",
                      "--reps", "1", "--single-step=", "--idle-slots", "2", "--kernels", "on"])
    (r,) = res["decode"]
    plain = tiny_run[0]["decode"][0]
    assert r["idle_slots"] == 2 and r["batch"] == 1 and r["rows"] == 3 and plain["rows"] == 1
    assert r["floor_bytes"] == plain["floor_bytes"]          # what the live row must read
    assert r["tok_s"] == pytest.approx(1e3 / r["step_ms"])
    assert "1+2 idle" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench.parse_args(["--idle-slots", "-1"])
    assert "--idle-slots -1: give a count of 0 or more" in capsys.readouterr().err


def test_tiny_floors_are_the_bytes_and_flops_of_the_config(tiny_run):
    res, _ = tiny_run
    t = bench.TINY
    d, h, kv, q, e, f, v, n_layers, k = (t["hidden_size"], t["num_attention_heads"], t["num_key_value_heads"],
                                         t["head_dim"], t["num_experts"], t["moe_intermediate_size"],
                                         t["vocab_size"], t["num_hidden_layers"], t["num_experts_per_tok"])
    attn = d * h * q + 2 * d * kv * q + h * q * d + 2 * d + 2 * q      # projections + 4 norms
    dense_params = n_layers * (attn + d * e) + d                         # + router, + final norm
    experts_params = n_layers * e * 3 * d * f
    inv = res["config"]["inventory"]
    assert inv["dense_params"] == dense_params and inv["experts_params"] == experts_params
    assert inv["dense_bytes"] == 2 * dense_params and inv["lm_head_bytes"] == 2 * d * v
    bw = res["ceilings"]["bandwidth"]
    for r in res["decode"]:
        b = r["batch"]
        kv_bytes = b * 16 * n_layers * 2 * kv * q * 2
        want = (2 * dense_params + 2 * experts_params * (1 - (1 - k / e) ** b) + 2 * d * v + b * 2 * d + kv_bytes)
        assert r["floor_bytes"] == pytest.approx(want)
        assert r["floor_ms"] == pytest.approx(1e3 * want / bw)
    (p,) = res["prefill"]
    flops = 2 * 8 * (dense_params + experts_params * k / e) + 2 * 8 ** 2 * h * q * n_layers + 2 * d * v
    assert p["flops"] == pytest.approx(flops)


def test_markdown_rows_for_benchmarks_md(tiny_run, capsys):
    res, _ = tiny_run
    text = bench.summary_text(res, markdown=True)
    assert "| kernels | batch | ms/step | tok/s | floor ms | % of floor |" in text
    assert "| kernels | prompt | ms (TTFT) |" in text
    assert text.count("\n| off | ") == 3   # two decode rows, one prefill row
    assert "2 of 2 layers" in text and "ceilings (this run, best call of each)" in text


def test_gpu_clocks_line_from_nvidia_smi(tiny_run):
    """The card's clocks and power in one line, in the summary's card line when there is one; None
    from unreadable output (no nvidia-smi: the CPU run here has clocks None and no such text)."""
    line = bench.gpu_clocks(lambda: "1905, 1980, 3201, 364.94, 700.00, 47, P0\n")
    assert line == "SM 1905 of 1980 MHz, memory 3201 MHz, 365 W of 700 W, 47 C, P0"
    assert bench.gpu_clocks(lambda: "") is None and bench.gpu_clocks(lambda: "[N/A], 1980\n") is None
    assert bench.gpu_clocks(lambda: "1410, 1980, 2619, [N/A], [N/A], 40, P0") == \
        "SM 1410 of 1980 MHz, memory 2619 MHz, [N/A] W of [N/A] W, 40 C, P0"
    res, _ = tiny_run
    assert res["env"]["clocks"] is None and " MHz" not in bench.summary_text(res, markdown=True)
    env = dict(res["env"], clocks=line)
    assert bench.summary_text(dict(res, env=env), markdown=True).startswith(f"- card: {env['card']}") and \
        f"commit {env['commit']} | {line}" in bench.summary_text(dict(res, env=env), markdown=True)


def test_layers_option_keeps_shapes_and_says_so():
    cfg = bench.resolve_bench_config("Qwen3-30B-A3B-FP8", 4)
    assert cfg.num_hidden_layers == 4 and cfg.hidden_size == 2048 and cfg.fp8 is not None
    with pytest.raises(SystemExit, match="--layers 99"):
        bench.resolve_bench_config("Qwen3-30B-A3B", 99)


def test_variant_flags_time_each_setting_and_restore_the_defaults():
    """--fp8-gemm, --decode-unroll, --x-loads, --attention-combine/-prologue, --fp8-matmul(-lhs),
    --fp8-copy, --fp8-dot-acc, --moe-routing, --router-logits and --projection-matmul time one row
    per setting (labelled), then put the library's defaults back."""
    from qwen3_jax import kernels
    from qwen3_jax import model as model_mod
    from qwen3_jax.kernels import decode_attention, dequantize, fp8_dot, linear, moe_blocks, moe_ffn, router
    from qwen3_jax.kernels.grouped_matmul import MATMUL_DEFAULTS

    def settings():
        return (kernels.fp8_gemm(), model_mod.DECODE_UNROLL, set(kernels.X_LOADS), decode_attention.COMBINE,
                decode_attention.PROLOGUE, dequantize.COPY, fp8_dot.ACCUMULATE,
                [(c["convert"], dict(c["fp8_nk"])) for c in MATMUL_DEFAULTS.values()],
                dict(linear.PROJECTION_MATMUL), moe_ffn.BLOCK_ROUTING, moe_ffn.DOWN_ROWS, moe_blocks.BLOCK_ROWS_SLACK,
                router.LOGITS, repr(MATMUL_DEFAULTS["large"]))

    before = settings()
    res = bench.main(["--model", "tiny-FP8", "--batch", "1", "--context", "16", "--prefill=", "--steps", "2",
                      "--reps", "1", "--single-step=", "--kernels", "on", "--fp8-gemm", "w8a8",
                      "--decode-unroll", "2", "--x-loads", "none,norm+swiglu", "--attention-combine", "xla",
                      "--attention-prologue", "separate", "--fp8-matmul", "f16", "--fp8-matmul-lhs", "x", "--fp8-copy", "xla",
                      "--fp8-dot-acc", "f32", "--moe-routing", "xla", "--moe-down-rows", "f32", "--moe-block-slack", "1",
                      "--router-logits", "gemv", "--projection-matmul", "narrow"])
    labels = [r["kernels"] for r in res["decode"]]
    assert labels == [f"on w8a8 unroll 2 x {x} merge xla attention-prologue separate fp8-matmul f16 fp8-lhs x fp8-copy xla "
                      "fp8-dot-acc f32 moe-routing xla moe-down-rows f32 moe-block-slack 1.0 router gemv projection narrow"
                      for x in ("none", "norm+swiglu")]
    assert all(r["step_ms"] > 0 for r in res["decode"])
    assert settings() == before
    # Unknown values: refused by the flag reader that bench.main ran above (bench._decode_knobs),
    # called directly here.
    cfg = bench.resolve_bench_config("tiny-FP8", None)
    for flag, value, message in (("--fp8-matmul", "bits", "--fp8-matmul bits: unknown"),
                                 ("--fp8-matmul-lhs", "y", "--fp8-matmul-lhs y: unknown; use x or w"),
                                 ("--fp8-copy", "cuda", "--fp8-copy cuda: unknown; use kernel or xla"),
                                 ("--fp8-dot-acc", "tf32", "--fp8-dot-acc tf32: unknown; use mma or f32"),
                                 ("--moe-routing", "sort", "--moe-routing sort: unknown; use kernel, kernel-scan or xla"),
                                 ("--router-logits", "dot", "--router-logits dot: unknown; use matmul or gemv"),
                                 ("--moe-down-rows", "f16", "--moe-down-rows f16: unknown; use x or f32"),
                                 ("--moe-block-slack", "two", "--moe-block-slack two: give positive numbers"),
                                 ("--moe-block-slack", "0", "--moe-block-slack 0: give positive numbers"),
                                 ("--attention-combine", "o_proj",
                                  "--attention-combine o_proj: unknown; use kernel or xla"),
                                 ("--attention-prologue", "xla",
                                  "--attention-prologue xla: unknown; use fused or separate"),
                                 ("--projection-matmul", "wide",
                                  "--projection-matmul wide: unknown; use narrow, narrow-qkv, split or split-qkv"),
                                 ("--matmul-large", '{"bn": 64}', "give a JSON list of objects"),
                                 ("--matmul-large", "[{bn: 64}]", "not JSON"),
                                 ("--matmul-large", '[{"stages": 4}]', "unknown key stages; use bk, bn, ")):
        args = bench.parse_args(["--model", "tiny-FP8", "--batch", "1", "--prefill=", flag, value])
        with pytest.raises(ValueError, match=message):
            bench._decode_knobs(args, cfg)
    # bench.main refuses them first, before it measures a ceiling or builds a model
    with pytest.raises(SystemExit, match="serve.bench: --projection-matmul wide: unknown"):
        bench.main(["--model", "tiny-FP8", "--batch", "1", "--prefill=", "--projection-matmul", "wide"])
    assert settings() == before


def test_fp8_order_builds_one_model_per_storage_order():
    """--fp8-order nk,kn: one FP8 model per storage order in the same process, rows labelled, the
    library's order restored; an unknown order is refused before anything is built."""
    from qwen3_jax import fp8
    before = fp8.NK_ORDER
    res = bench.main(["--model", "tiny-FP8", "--batch", "1", "--context", "16", "--prefill=", "--steps", "1",
                      "--reps", "1", "--single-step=", "--kernels", "off", "--fp8-order", "kn"])
    assert [r["kernels"] for r in res["decode"]] == ["off order kn"] and res["decode"][0]["step_ms"] > 0
    assert fp8.NK_ORDER == before
    with pytest.raises(ValueError, match="--fp8-order nm: use nk, kn or both"):
        bench.main(["--model", "tiny-FP8", "--batch", "1", "--prefill=", "--fp8-order", "nm"])


@pytest.mark.parametrize("span_us,warned", [(2562.0, False), (2774.0, True)])
def test_profile_says_when_the_gpu_waited_for_the_host(monkeypatch, span_us, warned):
    """profile_call's summary of a timeline (the profiler itself needs a GPU): runs 62 and 72's
    FP8 batch-1 shapes, 8 steps of 564 kernels busy 2578 us each, over a span of 2562 us (two
    streams overlap a little: no idle) or 2774 us (196 us idle per step: the warning)."""
    from qwen3_jax.kernels import tune

    steps = 8
    timeline = {"by_name": {"qwen3_gemv_dot_fp8": (steps * 100, steps * 1000e3),
                            "loop_add_fusion": (steps * 464, steps * 1578e3)},
                "lines": ["Stream #14(Compute)"], "first_ns": 0, "last_ns": steps * span_us * 1e3}
    monkeypatch.setattr(tune, "device_timeline", lambda call: timeline)
    lines = []
    out = bench.profile_call(lambda: None, steps, lines.append)
    assert out["kernels_per_step"] == 564 and out["busy_us_per_step"] == pytest.approx(2578.0)
    assert out["idle_us_per_step"] == pytest.approx(max(0.0, span_us - 2578.0))
    warnings = [s for s in lines if "WARNING" in s]
    assert bool(warnings) == warned
    if warned:
        assert "idle 196 us per step (7% of the span)" in warnings[0] and "fresh process" in warnings[0]


def load_benchmark(name: str):
    """A script of benchmarks/ as a module."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"{name}_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prefix_cache_benchmark_reuses_the_conversation_on_cpu(capsys):
    """benchmarks/prefix_cache.py with the tiny preset: turn 2 finds turn 1's prompt and reply
    (but the reply's last token) in the cache, and nothing without it; --burst shares a system
    prompt between requests sent together."""
    seconds = load_benchmark("prefix_cache").main(["--model", "tiny", "--context", "256", "--prompt", "96", "--reply", "16", "--new", "8",
                          "--reps", "1"])
    out = capsys.readouterr().out
    assert "(0 of 120 prompt tokens cached)" in out and "(111 of 120 prompt tokens cached)" in out
    assert set(seconds) == {False, True} and all(s > 0 for s in seconds.values())
    # --burst: three requests at once sharing a 96-token system prompt: two copy it from the first
    load_benchmark("prefix_cache").main(["--model", "tiny", "--context", "256", "--prompt", "96", "--new", "8",
                                         "--reps", "1", "--burst", "3"])
    out = capsys.readouterr().out
    assert "(0 of 312 prompt tokens cached)" in out and "(192 of 312 prompt tokens cached)" in out


def test_engine_warmup_benchmark_times_each_thread_count_in_its_own_process(capsys):
    """benchmarks/engine_warmup.py with the tiny preset: a row per thread count, each from a fresh
    process that ran an engine with that many compile threads over every forward (4 prefill
    buckets at context 256 with 512-token chunks, one KV window, the one CPU batch size), then
    timed its idle variant compiles and a decode step with both slots busy."""
    rows = load_benchmark("engine_warmup").main(["--model", "tiny", "--context", "256", "--slots", "2",
                                                 "--threads", "1,2"])
    assert [r["threads"] for r in rows] == [1, 2] and all(r["warmup_s"] > 0 for r in rows)
    assert {r["forwards"] for r in rows} == {4 + 1} and all(r["step_ms"] > 0 for r in rows)
    assert all(r["variants_s"] > 0 for r in rows)   # the idle variant compiles, waited for and timed
    out = capsys.readouterr().out
    assert "5 forwards" in out and "1.00x" in out
    assert f"{rows[1]['warmup_s'] / rows[0]['warmup_s']:.2f}x" in out


def test_prompt_ttft_benchmark_times_each_setting_and_restores_it(capsys):
    """benchmarks/prompt_ttft.py with the tiny preset: a median per prompt length and setting, in
    the order given, each against the first's; Engine.FRESH_MIN_TOKENS and SPLIT_MIN_TOKENS put
    back; with --fresh-min a prompt longer than the chunk refused, with --split-min taken."""
    from qwen3_jax.kernels import prefill_attention as pa
    from serve.engine import Engine

    before = (Engine.FRESH_MIN_TOKENS, pa.SPLIT_MIN_TOKENS)
    ttft = load_benchmark("prompt_ttft")
    rows = ttft.main(["--model", "tiny", "--context", "256", "--prompts", "20,60", "--chunk", "64", "--fresh-min",
                      "32,0", "--reps", "2"])
    assert [least for least, _ in rows] == [32, 0] and all(len(ms) == 2 and min(ms) > 0 for _, ms in rows)
    out = capsys.readouterr().out
    assert "fresh-min    32: 20 tokens" in out and f"({rows[1][1][1] / rows[0][1][1]:.3f}x)" in out
    rows = ttft.main(["--model", "tiny", "--context", "256", "--prompts", "150", "--chunk", "64", "--split-min",
                      "off,32", "--reps", "1"])
    assert [least for least, _ in rows] == [None, 32] and all(min(ms) > 0 for _, ms in rows)
    assert "split-min   off: 150 tokens" in capsys.readouterr().out
    assert (Engine.FRESH_MIN_TOKENS, pa.SPLIT_MIN_TOKENS) == before
    for bad in (["--prompts", "100", "--chunk", "64", "--fresh-min", "32"], ["--prompts", "20"],
                ["--prompts", "300", "--split-min", "off"], ["--prompts", "20", "--split-min", "on"]):
        with pytest.raises(SystemExit):
            ttft.main(["--model", "tiny", "--context", "256"] + bad)


def test_chunked_prefill_benchmark_times_each_variant_and_restores_the_kernel_settings(capsys):
    """benchmarks/chunked_prefill.py with the tiny preset: one figure per variant and start, the
    kernel's module settings put back, and the floor's FLOPs as the docstring counts them."""
    from qwen3_jax.kernels import prefill_attention as pa

    before = (pa.CHUNK_KERNEL, pa.CHUNK_ROWS, pa.CHUNK_KEYS, pa.CHUNK_WARPS, pa.CHUNK_STAGES, pa.CHUNK_SPLIT_PROGRAMS, pa.SPLIT_MIN_TOKENS, pa.SPLIT_PAGE)
    chunked = load_benchmark("chunked_prefill")
    ms = chunked.main(["--model", "tiny", "--context", "128", "--chunk", "32", "--starts", "0,64", "--reps", "1",
                       "--variants", "64:32:4:2,128:64:4:3,64:32:4:2:64,split,split-gather",
                       "--in-order", "promised,checked"])
    assert set(ms) == {(v, o, s) for v in ("64:32:4:2", "128:64:4:3", "64:32:4:2:64", "split", "split-gather", "xla")
                       for o in ("promised", "checked") for s in (0, 64)}
    assert all(t > 0 for t in ms.values())
    assert (pa.CHUNK_KERNEL, pa.CHUNK_ROWS, pa.CHUNK_KEYS, pa.CHUNK_WARPS, pa.CHUNK_STAGES, pa.CHUNK_SPLIT_PROGRAMS, pa.SPLIT_MIN_TOKENS, pa.SPLIT_PAGE) == before
    assert "128:64:4:3   checked      64" in capsys.readouterr().out
    import qwen3_jax
    model = qwen3_jax.random_model(bench.resolve_bench_config("tiny", None), dtype="bfloat16")
    inv = bench.weight_inventory(model)
    cfg = model.config
    assert chunked.chunk_flops(model, inv, 32, 64) == (bench.prefill_flops(model, inv, 32) + 4 * 32 * 64
                                                     * cfg.num_attention_heads * cfg.head_dim * cfg.num_hidden_layers)
    with pytest.raises(SystemExit):
        chunked.main(["--model", "tiny", "--context", "64", "--chunk", "32", "--starts", "48"])
    with pytest.raises(SystemExit):
        chunked.main(["--model", "tiny", "--context", "64", "--chunk", "32", "--in-order", "sorted"])


def test_kernel_registers_captures_each_steps_triton_kernels_on_cpu():
    """benchmarks/kernel_registers.py's lowering, with the tiny preset on this CPU host: each step
    is lowered for CUDA with the kernels on, the Triton IR of every pallas_call captured with its
    launch parameters (the blocks path's routing and grouped matmuls at a 64-token prefill), and
    the kernels setting restored after. (Compiling the IR needs the `triton` package; not here.)"""
    from qwen3_jax import kernels

    mod = load_benchmark("kernel_registers")
    on_gpu, override = kernels.on_gpu, kernels._override
    steps = dict(mod.lower_steps("tiny", [1], [64], 64))
    assert kernels.on_gpu is on_gpu and kernels._override == override
    decode, prefill = ([name for name, *_ in steps[k]] for k in ("decode batch 1", "prefill 64"))
    assert "qwen3_decode_attention" in decode and "qwen3_gemv_dot" in decode
    assert prefill == ["qwen3_route_histogram", "qwen3_route_blocks", "qwen3_grouped_matmul", "qwen3_grouped_matmul"]
    for name, warps, stages, ir in steps["prefill 64"]:
        assert warps in (1, 2, 4, 8) and stages >= 1
        assert ir.startswith(f"module @{name}") and "tt.func public @" in ir
    # CTAs an SM holds: the 8k W8A8 gate/up (255 registers x 256 threads, 144 KB) one; the
    # bm 64 + bn 64 + 4-warp tiling (183 registers -> 184 x 128, 72 KB) two, by registers
    assert mod.ctas_per_sm(255, 147456, 8) == 1 and mod.ctas_per_sm(183, 73728, 4) == 2
    assert mod.ctas_per_sm(32, 0, 4) == 16   # the thread limit: 2048 / 128


def test_matmul_large_times_each_tiling_and_restores_the_library_s(monkeypatch):
    """--matmul-large: one prefill row per override, each run with its tiles installed over the
    library's (seen from inside bench_prefill) and with the other knobs that edit those tiles
    (--fp8-matmul) still applied, then the library's tiles back."""
    from qwen3_jax.kernels import grouped_matmul as gm_mod

    before = repr(gm_mod.MATMUL_DEFAULTS)
    seen = []
    real = bench.bench_prefill
    monkeypatch.setattr(bench, "bench_prefill", lambda *a, **kw: seen.append(
        dict(gm_mod.MATMUL_DEFAULTS["large"])) or real(*a, **kw))
    res = bench.main(["--model", "tiny-FP8", "--batch=", "--prefill", "32", "--reps", "2", "--kernels", "on",
                      "--matmul-large", '[{}, {"num_stages": 2, "bn": 64}]', "--fp8-matmul", "f16"])
    assert [r["kernels"] for r in res["prefill"]] == ['on matmul-large {} fp8-matmul f16',
                                                      'on matmul-large {"num_stages":2,"bn":64} fp8-matmul f16']
    assert all(r["ms"] > 0 for r in res["prefill"])
    library = dict(eval(before)["large"], convert="f16")   # noqa: S307 (our own repr of plain dicts)
    assert seen == [library, {**library, "num_stages": 2, "bn": 64}]
    assert repr(gm_mod.MATMUL_DEFAULTS) == before
