"""Test setup: 8 simulated CPU devices (set before JAX initializes) and shared fixtures.

QWEN3_JAX_REQUIRE_REFERENCE=1 (set by .ci/run) turns a skipped reference test into a failure,
so CI can never pass by silently skipping the comparison with transformers.

On CPU, JAX_DISABLE_MOST_OPTIMIZATIONS=1 (JAX's switch for when optimizing a program costs more
than running it unoptimized; the environment, so the servers, notebooks and workers started
here get it too): XLA's LLVM code generation runs at -O0. Compiling is most of this suite's
time, and the flag takes a third to a half off each compile of the tiny models. XLA's HLO passes
(fusion, SPMD partitioning, buffer assignment, hence the memory plan's workspace bytes) are the
same; float results may differ in the last bits, within every tolerance here. Tests whose run
time dominates take the `xla_optimized` fixture (test_serve_http's servers: the variable set to
0). GPU runs (QWEN3_JAX_TEST_GPU=1) keep JAX's defaults.

On CPU, JAX's persistent compilation cache in a directory made for this run (or the one
JAX_COMPILATION_CACHE_DIR names): many tests build the same tiny models and engines, and each jit
function object compiles its program again; from the cache, an identical program is compiled
once per run (test_engine.py alone: 157 -> 109 s). The directory reaches pytest-xdist's workers
and the servers started here through the environment; the process that made it removes it.
"""

import atexit
import os
import shutil
import tempfile

ON_GPU_RUN = os.environ.get("QWEN3_JAX_TEST_GPU") == "1"
os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
if not ON_GPU_RUN:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")  # read when jax is imported
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="qwen3-jax-tests-xla-")
        atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")   # -O0 compiles take under 1 s
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402
import pytest  # noqa: E402

try:
    jax.config.update("jax_num_cpu_devices", 8)
except Exception:  # older/newer JAX without the option: XLA_FLAGS above does it
    pass


def has_gpu() -> bool:
    try:
        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


def pytest_collection_modifyitems(config, items):
    if has_gpu():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device machine with QWEN3_JAX_TEST_GPU=1)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_runtest_makereport(item, call):
    pass


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_logreport(report):
    yield


def require_reference():
    """Import torch + transformers, or skip (fail when QWEN3_JAX_REQUIRE_REFERENCE=1)."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        if os.environ.get("QWEN3_JAX_REQUIRE_REFERENCE") == "1":
            pytest.fail(f"reference test needs torch and transformers: {e}")
        pytest.skip(f"torch/transformers not installed: {e}")


@pytest.fixture
def xla_optimized():
    """XLA's full optimization for this test's compiles (see the module docstring): for tests
    whose run time, not compile time, dominates (loading ~100 MB, interpret-mode kernels on a
    whole model), where -O0 code costs more than the compile saves. The flag is not part of
    JAX's jit cache key: programs this process compiled before are reused as they are."""
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", False)
    yield
    jax.config.update("jax_disable_most_optimizations", before)


@pytest.fixture
def cuda_lowering(monkeypatch):
    """kernels.on_gpu() True for this test, so Pallas lowers to Triton rather than interpret mode
    (lowering tests: nothing runs). JAX's trace caches are cleared after it: a jitted function
    that reads the interpret setting while tracing keeps that trace, and a later test running
    kernels on the CPU at the same shapes would get the Triton one ("Only interpret mode is
    supported on CPU backend")."""
    from qwen3_jax import kernels
    monkeypatch.setattr(kernels, "on_gpu", lambda: True)
    yield
    jax.clear_caches()


@pytest.fixture
def fp8_w8a16(monkeypatch):
    """FP8 kernels in W8A16 for this test: the GEMVs and the grouped matmuls. The defaults run
    W8A8 (GEMVs from gemv.W8A8_MIN_ROWS rows, grouped matmuls always), whose e4m3 activations move
    results ~3% on random data: tests that hold the FP8 kernels to bf16 precision pin W8A16 with
    this. (W8A8's layout "n" also needs checkpoint-block scales, which fp8_weights gives only when
    asked.)"""
    from qwen3_jax import kernels
    from qwen3_jax.kernels import grouped_matmul as gm_mod
    for size, cfg in gm_mod.MATMUL_DEFAULTS.items():
        monkeypatch.setitem(gm_mod.MATMUL_DEFAULTS, size, dict(cfg, convert="f16"))
    before = kernels.fp8_gemm()
    kernels.set_fp8_gemm("w8a16")
    yield
    kernels.set_fp8_gemm(before)
