"""`python -m serve`: load a checkpoint (or the built-in model), size the KV cache, compile, serve.

Order matters: arguments are parsed and the mesh spec checked before JAX initializes, so that
on a CPU-only machine as many CPU devices exist as the mesh needs (`--mesh tp=4,ep=8` works on
a laptop), and `--dry-run` never touches a device.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import time

from .chat_parsers import REASONING_PARSERS, TOOL_CALL_PARSERS

log = logging.getLogger("serve")

BUILTIN_NAME = "qwen3-jax-builtin"


def _sizes(text: str) -> list[int]:
    """'1,2,4,8' -> [1, 2, 4, 8] (argparse type: a bad list is a usage error naming it)."""
    try:
        sizes = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of positive batch sizes; write e.g. 1,2,4,8")
    return sizes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m serve",
        description="OpenAI-compatible server for Qwen3-MoE checkpoints in JAX. With no --model it serves "
                    "a small built-in model (random weights, no download).")
    p.add_argument("--model", metavar="DIR", default=None,
                   help="Hugging Face checkpoint directory (bf16 or block-FP8 safetensors); default: the built-in model")
    p.add_argument("--mesh", metavar="SPEC", default="",
                   help="device mesh, e.g. 'tp=4,ep=8' (8 devices: attention tp=4 x dp=2, experts over 8); default: one device")
    p.add_argument("--host", metavar="HOST", default="127.0.0.1", help="address to listen on (0.0.0.0 for all interfaces)")
    p.add_argument("--port", metavar="PORT", type=int, default=30000, help="port to listen on")
    # = sharding.memory.DEFAULT_MEM_FRACTION_STATIC (a literal so --help does not import JAX;
    # tests/test_serve_cli.py checks they agree)
    p.add_argument("--mem-fraction-static", metavar="F", type=float, default=0.85,
                   help="fraction of each device's memory for weights + KV cache (the rest is workspace)")
    p.add_argument("--max-running-requests", metavar="N", type=int, default=None,
                   help="most requests decoding at once (KV-cache slots); default: as many as memory allows, at most 64 (16 on CPU)")
    p.add_argument("--decode-batch-sizes", metavar="B,B,...", type=_sizes, default=None,
                   help="decode batch sizes compiled at start-up (a step runs at the smallest holding its requests; "
                        "the slot count is always added); default on a GPU: 1,2,4,... below the slot count, so one "
                        "request decodes as a batch of 1; pass the slot count alone for one shape whatever the load")
    p.add_argument("--disable-overlap-schedule", action="store_true",
                   help="read each decode step's tokens back before launching the next (default: the next step is "
                        "launched first, so detokenizing and streaming overlap the device's work)")
    p.add_argument("--disable-prefix-caching", action="store_true",
                   help="prefill every prompt whole (default: a request takes the free slot whose KV cache holds "
                        "the longest start of its prompt, e.g. the conversation so far, and prefills only the rest)")
    p.add_argument("--max-queued-requests", metavar="N", type=int, default=1024,
                   help="most requests waiting for a slot; more are refused with HTTP 503")
    p.add_argument("--context-length", metavar="TOKENS", type=int, default=None,
                   help="longest prompt + completion per request, in tokens; default: the model's max_position_embeddings")
    p.add_argument("--chunked-prefill-size", metavar="TOKENS", type=chunk_size, default="auto",
                   help="longest prompt piece prefilled in one step (longer prompts go in chunks); bounds compiles and "
                        "memory. auto (default): 2048 or 1024 where the memory plan's workspace for it costs at most "
                        "10%% of the KV cache of 512 (long prompts' first token sooner, running requests paused "
                        "longer), else 512; 512 without a plan (CPU)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"],
                   help="compute dtype of weights and KV cache (FP8 checkpoints keep FP8 weights)")
    p.add_argument("--served-model-name", metavar="NAME", default=None,
                   help="model name clients send and /v1/models lists; default: the --model path as given")
    p.add_argument("--reasoning-parser", choices=REASONING_PARSERS, default=None,
                   help="split a chat reply's <think>...</think> into message.reasoning_content (as vLLM and "
                        "SGLang do with the same flag); off: the thinking stays in content")
    p.add_argument("--tool-call-parser", choices=TOOL_CALL_PARSERS, default=None,
                   help="turn <tool_call>{json}</tool_call> blocks of a chat reply to a request with tools into "
                        "message.tool_calls, finish_reason tool_calls (Qwen3's format: vLLM's hermes, SGLang's "
                        "qwen25); off: they stay in content")
    p.add_argument("--api-key", metavar="KEY", default=os.environ.get("QWEN3_JAX_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: $QWEN3_JAX_API_KEY, else open)")
    p.add_argument("--compilation-cache", metavar="DIR", default=None,
                   help="where compiled XLA programs are kept so a restart skips compiling "
                        "(default: $XDG_CACHE_HOME/qwen3-jax/xla; 'off' disables)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="logging verbosity")
    from . import distributed
    distributed.add_arguments(p)  # --nnodes, --node-rank, --dist-init-addr, --dist-timeout
    try:
        from . import dry_run
    except ImportError:  # serve/dry_run.py is another piece of work; serving does not need it
        return p
    dry_run.add_arguments(p)  # --dry-run, --json, --sweep, --device-memory, --num-devices
    return p


def prepare_devices(mesh: str) -> int:
    """Before JAX initializes: make the CPU platform expose as many devices as the mesh needs.

    Harmless on GPU machines (only the host platform is affected). -> devices the mesh needs.
    """
    from sharding.mesh import parse_mesh_spec, request_cpu_devices

    # JAX's GPU allocator takes 75% of a card by default; the server owns the card and splits it
    # itself (--mem-fraction-static for weights + KV cache, the rest workspace), so let it see 95%.
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    n = parse_mesh_spec(mesh).num_devices
    if n > 1:
        request_cpu_devices(n)
    return n


def enable_compilation_cache(path: str | None):
    """JAX's persistent compilation cache: the second start of the same setup skips XLA compiles."""
    if path == "off":
        return
    import jax

    from .builtin import cache_root

    path = path or os.path.join(cache_root(), "xla")
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # small entries, all worth keeping
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def check_port(host: str, port: int):
    """Fail before minutes of loading and compiling if the port is taken."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise SystemExit(f"error: cannot listen on {host}:{port} ({e.strerror}); pass another --port")


def chunk_size(text: str):
    """--chunked-prefill-size: 'auto' or a positive token count."""
    if text == "auto":
        return text
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a token count; pass a positive integer (e.g. 2048) or auto")
    return n


def resolved_chunk_size(args, plan=None) -> int:
    """The chunk size to run: the one given, else the plan's choice, else (no plan) the base."""
    from sharding.memory import AUTO_CHUNK_BASE

    if args.chunked_prefill_size != "auto":
        return args.chunked_prefill_size
    return plan.chunked_prefill_size if plan is not None else AUTO_CHUNK_BASE


def _memory_plan(args, cfg, spec):
    """The memory planner's plan for this device (sharding/memory.py), or None on CPU.

    It compiles the engine's own steps on the real devices for XLA's memory analysis (nothing
    is allocated) and counts weights from the model's declared shardings.
    """
    import jax

    try:
        from sharding.memory import plan_memory_chunked

        from .dry_run import ENGINE_STEPS
    except ImportError:  # no planner: capacity.py sizes the cache from memory_stats() instead
        return None
    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:  # platforms without memory figures raise or return None
        stats = None
    if not stats or "bytes_limit" not in stats:
        return None
    return plan_memory_chunked(cfg, spec, args.chunked_prefill_size, device_memory_bytes=int(stats["bytes_limit"]),
                               mem_fraction_static=args.mem_fraction_static, context_length=args.context_length,
                               max_running_requests=args.max_running_requests, dtype=args.dtype, steps=ENGINE_STEPS)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    node = f"[node {args.node_rank}] " if args.nnodes > 1 else ""
    logging.basicConfig(level=args.log_level.upper(), format=f"%(asctime)s %(levelname)s {node}%(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)  # "no TPU backend" on every start
    from .distributed import DistributedError
    if getattr(args, "dry_run", False):
        from . import dry_run
        if args.nnodes > 1:
            try:
                _plan_nodes(args)
            except DistributedError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
        return dry_run.run(args)
    from sharding.mesh import MeshSpecError

    missing = missing_http_modules() if args.node_rank == 0 else []
    if missing:  # found now, not after minutes of loading and compiling
        print(f"error: the HTTP server needs {', '.join(missing)}, not installed in this environment "
              f"({sys.executable}); install the project with `pip install -e .` from the repository, or "
              f"`pip install {' '.join(HTTP_MODULES[m] for m in missing)}`", file=sys.stderr)
        return 2
    try:
        n = prepare_devices(args.mesh)
    except MeshSpecError as e:
        print(f"error: --mesh {args.mesh!r}: {e}", file=sys.stderr)
        return 2
    from . import distributed
    watchdog = None
    try:
        distributed.check_args(args, n)
        if args.node_rank == 0:  # only rank 0 listens
            check_port(args.host, args.port)
        if args.nnodes > 1:  # before anything else touches JAX
            watchdog = distributed.initialize(args, n)
    except DistributedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    enable_compilation_cache(args.compilation_cache)
    from qwen3_jax.config import ConfigError
    from qwen3_jax.safetensors_io import CheckpointError

    try:
        return _serve(args, watchdog)
    except (MeshSpecError, ConfigError, CheckpointError, FileNotFoundError, DistributedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        log.info("interrupted before the server started")
        return 130


# The modules rank 0's HTTP server imports (pyproject's dependencies), by their pip names.
HTTP_MODULES = {"fastapi": "fastapi", "uvicorn": "uvicorn", "prometheus_client": "prometheus-client"}


def missing_http_modules() -> list[str]:
    import importlib.util
    return [m for m in HTTP_MODULES if importlib.util.find_spec(m) is None]


def _plan_nodes(args):
    """--dry-run --nnodes N: the plan is per device; say how the mesh's devices split over the nodes."""
    from sharding.mesh import MeshSpecError, parse_mesh_spec

    from .distributed import check_args

    try:
        n = parse_mesh_spec(args.mesh, getattr(args, "num_devices", None)).num_devices
    except MeshSpecError:
        return  # the planner reports it
    check_args(args, n, need_addr=False)
    if not getattr(args, "json", False):
        print(f"nodes: {args.nnodes} x {n // args.nnodes} devices ({n} in the mesh); every device holds the share "
              "planned below, whichever node it is on")


def _serve(args, watchdog=None) -> int:
    from qwen3_jax import kernels
    from qwen3_jax.config import Qwen3MoeConfig
    from sharding.layout import human_bytes
    from sharding.mesh import check_against_config, parse_mesh_spec

    from .builtin import builtin_checkpoint
    from .capacity import CapacityError
    from .engine import Engine

    path = args.model or builtin_checkpoint()
    name = args.served_model_name or (args.model.rstrip("/") if args.model else BUILTIN_NAME)
    cfg = Qwen3MoeConfig.from_json(path)
    spec = parse_mesh_spec(args.mesh)
    check_against_config(spec, cfg)
    log.info("model %s (%s%s) from %s", name, cfg.name, ", FP8 weights" if cfg.fp8 else "", path)
    log.info(spec.describe())
    log.info(kernels.describe())
    if watchdog is not None:
        from .distributed import describe
        log.info(describe(args, spec.num_devices))
    kv_tokens, max_running = None, args.max_running_requests
    plan = _memory_plan(args, cfg, spec)
    if plan is None:
        pass  # no planner figure (CPU): the engine sizes the cache and says how below
    elif not plan.fits:
        print(plan.format(), file=sys.stderr)
        log.error("refusing to start: the model does not fit this mesh at --mem-fraction-static %s "
                  "(plan above; `python -m serve --dry-run --sweep ...` compares meshes)", args.mem_fraction_static)
        return 1
    else:
        # the plan's slots (KV cache and sampler state both fit them), at most --max-running-requests
        kv_tokens, max_running = plan.kv_cache_tokens, plan.max_concurrent_requests
        log.info("%s", plan.format())
    t0 = time.perf_counter()
    try:
        engine = Engine(path, mesh=spec, dtype=args.dtype, context_length=args.context_length,
                        max_running_requests=max_running,
                        mem_fraction_static=args.mem_fraction_static, kv_cache_tokens=kv_tokens,
                        max_queued_requests=args.max_queued_requests,
                        chunked_prefill_size=resolved_chunk_size(args, plan),
                        decode_batch_sizes=args.decode_batch_sizes, overlap=not args.disable_overlap_schedule,
                        prefix_caching=not args.disable_prefix_caching)
    except (CapacityError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    weights = engine.model.param_bytes_per_device()
    log.info("weights: %s per device (%d device%s, %s)", human_bytes(max(weights.values())), len(weights),
             "s" if len(weights) > 1 else "", engine.model.dtype)
    log.info(engine.cache_size.describe())
    try:
        if args.node_rank > 0:  # a follower: no HTTP; run rank 0's steps until it stops
            from .distributed import run_follower
            log.info("ready in %.1fs; following rank 0's steps", time.perf_counter() - t0)
            return run_follower(engine, watchdog)
        log.info("ready in %.1fs", time.perf_counter() - t0)
        return run_server(engine, name, args)
    finally:
        # Also on an error: the scheduler thread stopped before the interpreter exits (an exit
        # with it still stepping on the device crashed, run 134).
        engine.shutdown(timeout=10)


def run_server(engine, name: str, args) -> int:
    import uvicorn

    from .openai_api import create_app

    app = create_app(engine, name, api_key=args.api_key, reasoning_parser=args.reasoning_parser,
                     tool_call_parser=args.tool_call_parser)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            # First end every request (streams get an error event, waiting calls a 503), so the
            # graceful shutdown that follows has no open stream to wait for.
            if engine.accepting:
                log.info("shutting down: ending %d running and %d queued requests",
                         engine.num_running, engine.num_queued)
            engine.shutdown(timeout=0)
            super().handle_exit(sig, frame)
            # uvicorn re-raises captured signals after its shutdown, which would kill the process
            # (SIGTERM) or raise KeyboardInterrupt (SIGINT) after a clean stop; we exit normally.
            self._captured_signals.clear()

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=5, access_log=args.log_level == "debug")
    host = f"[{args.host}]" if ":" in args.host else args.host
    log.info("serving %s at http://%s:%d/v1 (OpenAI API; also /health and /metrics)%s", name, host, args.port,
             "; API key required" if args.api_key else "")
    server = Server(config)
    server.run()
    engine.shutdown(timeout=10)
    log.info("stopped")
    return 0
