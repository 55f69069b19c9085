"""`python -m serve` argument handling that needs no compile: --help, refusals before loading."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from serve.cli import build_parser

FLAGS = ["--model", "--mesh", "--host", "--port", "--mem-fraction-static", "--max-running-requests",
         "--context-length", "--dtype", "--served-model-name", "--api-key", "--log-level", "--decode-batch-sizes",
         "--disable-overlap-schedule"]


def run(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "serve", *args], capture_output=True, text=True, timeout=timeout)


def test_help_explains_every_flag():
    out = run("--help").stdout
    for flag in FLAGS:
        assert flag in out
    actions = {s: a for a in build_parser()._actions for s in a.option_strings}
    for flag in FLAGS:
        assert actions[flag].help and len(actions[flag].help) > 15, flag
    defaults = build_parser().parse_args([])
    assert (defaults.host, defaults.port, defaults.model, defaults.mesh) == ("127.0.0.1", 30000, None, "")


def test_mem_fraction_default_is_the_planners():
    from sharding.memory import DEFAULT_MEM_FRACTION_STATIC
    from serve.cli import build_parser

    assert build_parser().parse_args([]).mem_fraction_static == DEFAULT_MEM_FRACTION_STATIC


def test_decode_batch_sizes_flag(capsys):
    assert build_parser().parse_args(["--decode-batch-sizes", "1,2, 8"]).decode_batch_sizes == [1, 2, 8]
    assert build_parser().parse_args([]).decode_batch_sizes is None     # the engine's default
    assert not build_parser().parse_args([]).disable_overlap_schedule  # overlap on by default
    assert build_parser().parse_args(["--disable-overlap-schedule"]).disable_overlap_schedule
    for bad in ("0,2", "x", ""):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["--decode-batch-sizes", bad])
        assert "is not a list of positive batch sizes; write e.g. 1,2,4,8" in capsys.readouterr().err


def test_chunked_prefill_size_flag(capsys):
    from serve.cli import resolved_chunk_size
    from sharding.memory import AUTO_CHUNK_BASE

    args = build_parser().parse_args([])
    assert args.chunked_prefill_size == "auto" and resolved_chunk_size(args) == AUTO_CHUNK_BASE == 512   # no plan
    assert resolved_chunk_size(build_parser().parse_args(["--chunked-prefill-size", "1024"])) == 1024
    for bad in ("0", "-5", "big"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["--chunked-prefill-size", bad])
        assert "is not a token count; pass a positive integer (e.g. 2048) or auto" in capsys.readouterr().err


def test_bad_mesh_is_refused_with_a_way_out():
    r = run("--mesh", "tp=3", "--port", "0")
    assert r.returncode == 2
    assert "tp=3" in r.stderr and "num_attention_heads=8" in r.stderr and "--mesh tp=2" in r.stderr
    assert "Traceback" not in r.stderr


def test_missing_checkpoint_and_busy_port_are_refused():
    r = run("--model", "/nonexistent/ckpt", "--port", "0")
    assert r.returncode == 2 and "/nonexistent/ckpt" in r.stderr and "Traceback" not in r.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = run("--port", str(port))
    assert r.returncode != 0 and f"127.0.0.1:{port}" in r.stderr and "--port" in r.stderr


@pytest.mark.parametrize("spec,devices", [("", 1), ("tp=2,ep=4", 4), ("tp=4,ep=8", 8)])
def test_prepare_devices_counts_what_the_mesh_needs(spec, devices):
    from serve.cli import prepare_devices

    assert prepare_devices(spec) == devices  # in this process JAX already has 8 CPU devices: a no-op


def test_missing_http_modules_are_refused_before_anything_loads(monkeypatch, capsys):
    """Without the HTTP server's modules (an environment that never ran `pip install -e .`), the
    error names each and the install, before devices are set up or weights read (run 134 met
    it after 38 s of loading and compiling)."""
    from serve import cli
    monkeypatch.setitem(cli.HTTP_MODULES, "qwen3_jax_no_such_module", "no-such-package")

    def never(*a, **k):
        raise AssertionError("devices prepared before the module check")
    monkeypatch.setattr(cli, "prepare_devices", never)
    assert cli.main(["--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "qwen3_jax_no_such_module" in err and "pip install -e ." in err and "pip install no-such-package" in err
    assert "fastapi" not in err.split("needs")[1].split("not installed")[0]   # only what is missing is named


def test_a_server_that_fails_after_loading_stops_its_engine(monkeypatch, tmp_path):
    """An error once the engine runs (here the HTTP server's start) still stops the scheduler
    thread before main returns: run 134's process, left with it stepping, crashed at exit."""
    from serve import cli
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    engines = []

    def failing_server(engine, name, args):
        engines.append(engine)
        raise OSError("the HTTP server could not start")
    monkeypatch.setattr(cli, "run_server", failing_server)
    with pytest.raises(OSError, match="could not start"):
        cli.main(["--port", "0", "--dtype", "float32", "--context-length", "64", "--chunked-prefill-size", "32",
                  "--max-running-requests", "2", "--decode-batch-sizes", "2", "--log-level", "warning",
                  "--compilation-cache", "off"])   # in this process: no persistent cache for the tests after it
    [engine] = engines
    assert not engine.accepting and not engine._thread.is_alive()
