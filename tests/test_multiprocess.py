"""Two processes, one mesh (serve/distributed.py): CPU devices, gloo collectives, 127.0.0.1.

`tp=4,ep=8` is 8 devices; here they are 2 processes x 4 simulated CPU devices, so attention's
data axis and half of the expert axis cross the process boundary. Everything is float32.

  logits    this file run as a worker script by two processes (`python tests/test_multiprocess.py
            worker RANK ADDR CKPT OUT`): they load the built-in checkpoint into the 2 x 4 mesh, and
            their logits equal one process on one device; each read only its own slices. Then
            rank 1 freezes (SIGSTOP: alive but silent, like a node cut off the network) and rank
            0's watchdog must give up on it after --dist-timeout, naming it.
  server    `python -m serve --nnodes 2` (rank 0 serves, rank 1 follows) answers greedy and seeded
            requests with exactly the text a single-process server gives; then rank 1 is killed
            mid-stream and rank 0 must exit non-zero naming rank 1, within a bounded time. A second
            pair, started with the rest, is stopped with SIGTERM: both ranks exit 0 (it runs the
            smallest mesh of two processes, tp=2: one device each, as how ranks stop does not depend on it).
Every process starts at once in one module fixture (about a minute on a busy 2-core machine). The
server tests run first: rank 0 of the workers waits out its --dist-timeout meanwhile.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __name__ == "__main__":  # run as the worker script: import serve/ and qwen3_jax/ from the repo
    sys.path.insert(0, ROOT)
MESH = "tp=4,ep=8"
TOKENS = (np.arange(2 * 19, dtype=np.int32).reshape(2, 19) * 37 + 5) % 576  # [B=2, T=19], builtin vocab 576


# -- the worker: run by two processes, before JAX starts ----------------------------------------
def count_reads():
    """Count elements qwen3_jax.load reads from the checkpoint: (counts dict, undo)."""
    from qwen3_jax import checkpoint

    counts = {"experts": 0, "other": 0}
    orig = checkpoint.LazyView.__getitem__

    def getitem(self, index):
        out = orig(self, index)
        counts["experts" if self.stacked else "other"] += int(out.size)
        return out

    checkpoint.LazyView.__getitem__ = getitem
    return counts, lambda: setattr(checkpoint.LazyView, "__getitem__", orig)


SILENCE_S = 15  # the workers' --dist-timeout


def worker(rank: int, addr: str, ckpt: str, out: str) -> int:
    import argparse

    from serve.distributed import initialize

    initialize(argparse.Namespace(nnodes=2, node_rank=rank, dist_init_addr=addr, dist_timeout=SILENCE_S), 8)
    import jax
    from jax.experimental import multihost_utils

    from qwen3_jax import api

    counts, _ = count_reads()
    model = api.load(ckpt, mesh=MESH, dtype="float32", progress=False)
    logits, _ = model.forward(TOKENS)
    full = multihost_utils.process_allgather(logits, tiled=True)  # [B, T, V] on every process
    if rank == 0:
        np.save(os.path.join(out, "logits.npy"), np.asarray(full))
    multihost_utils.sync_global_devices("results written")
    info = dict(rank=jax.process_index(), processes=jax.process_count(), devices=jax.device_count(),
                local=jax.local_device_count(), reads=counts, frozen_at=time.time())
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(info, f)
    if rank == 1:
        os.kill(os.getpid(), signal.SIGSTOP)  # alive, connections open, no heartbeats: a node cut off
    time.sleep(SILENCE_S + 60)
    return 3  # rank 0's watchdog should have ended this process by now


# -- tests ------------------------------------------------------------------------------------
import argparse  # noqa: E402

import pytest  # noqa: E402

openai = pytest.importorskip("openai")

from serve.builtin import CORPUS, builtin_checkpoint  # noqa: E402
from serve.process import ServerProcess, free_port  # noqa: E402

NAME = "qwen3-jax-builtin"
BASE = ["--dtype", "float32", "--context-length", "256", "--chunked-prefill-size", "32", "--max-running-requests", "4"]
COMMON = BASE + ["--mesh", MESH]
WORDS = CORPUS.split()
PROMPTS = [" ".join(WORDS[3 * i: 3 * i + 2 + 5 * i]) for i in range(8)]  # 2 to ~40 words: 1 or 2 chunks


def test_step_message_round_trip_is_bitwise():
    from serve.distributed import HEADER, pack, unpack

    arrays = [np.arange(64, dtype=np.int32).reshape(1, 64) - 7, np.array([0.1, -np.inf, np.nan, -0.0], np.float32),
              np.array([2**32 - 1], np.uint32), np.full((2, 3, 4), 1.5, np.float32)[:, ::2],  # non-contiguous
              np.zeros((0,), np.int32)]
    step, seq, back = unpack(pack(5, 9, arrays, HEADER + 200))
    assert (step, seq, len(back)) == (5, 9, len(arrays))
    for a, b in zip(arrays, back):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert np.ascontiguousarray(a).tobytes() == b.tobytes()
    with pytest.raises(ValueError, match="over the message size 100"):
        pack(2, 0, [np.zeros(40, np.int32)], 100)
    with pytest.raises(TypeError, match="int64"):
        pack(2, 0, [np.zeros(3, np.int64)], HEADER + 10)


def test_engine_capacity_holds_its_largest_steps():
    from serve.distributed import HEADER, engine_capacity, pack

    words = -(-151936 // 32)   # a structured-output mask row of Qwen3's vocabulary
    size = HEADER + engine_capacity(num_slots=64, max_bucket=512, context_length=4096, mask_words=words)
    one = lambda dt: np.zeros(1, dt)  # noqa: E731
    # with prompt logprobs (targets [1, T]) and penalties: 3 more sampling scalars / vectors
    # (presence, frequency, repetition) and, in prefill, the prompt ids to flag [1, S]; a mask [B, W]
    prefill = ([np.zeros((1, 512), np.int32)] * 3 + [one(np.int32)] * 2 + [one(np.float32)] * 2 + [one(np.int32)] * 3
               + [one(np.float32)] * 3 + [np.zeros((1, 4096), np.int32), np.zeros((1, words), np.int32)])
    decode = ([np.zeros(64, np.int32)] * 2 + [np.zeros(64, np.float32)] * 2 + [np.zeros(64, np.int32)] * 3
              + [np.zeros(64, np.float32)] * 3 + [np.zeros((64, words), np.int32)])
    pack(3, 0, prefill, size)
    pack(4, 0, decode, size)
    with pytest.raises(ValueError):   # without the mask's room the masked decode step does not fit
        pack(4, 0, decode, HEADER + engine_capacity(num_slots=64, max_bucket=512, context_length=4096))


def _args(**kw):
    base = dict(nnodes=2, node_rank=0, dist_init_addr="10.0.0.1:29500", dist_timeout=60)
    return argparse.Namespace(**{**base, **kw})


@pytest.mark.parametrize("kw, devices, message", [
    (dict(dist_init_addr=None), 8, "needs --dist-init-addr HOST:PORT"),
    (dict(node_rank=2), 8, "--node-rank 2 is not a rank of --nnodes 2; use 0..1"),
    (dict(nnodes=1, node_rank=1), 8, "--node-rank 1 is not a rank of --nnodes 1"),
    (dict(nnodes=3), 8, "8 devices do not split evenly over --nnodes 3"),
    (dict(dist_init_addr="10.0.0.1"), 8, "is not HOST:PORT"),
    (dict(dist_init_addr="10.0.0.1:99999"), 8, "is not HOST:PORT"),
    (dict(dist_timeout=1), 8, "shorter than two heartbeats"),
])
def test_bad_flags_are_refused_before_jax(kw, devices, message):
    from serve.distributed import DistributedError, check_args

    with pytest.raises(DistributedError, match=re.escape(message)):
        check_args(_args(**kw), devices)


def test_good_flags_and_addresses():
    from serve.distributed import check_args, split_addr

    check_args(_args(), 8)
    check_args(_args(nnodes=1, dist_init_addr=None), 1)  # one process: nothing else needed
    assert split_addr("node01:29500") == ("node01", 29500)
    assert split_addr("[fe80::1]:29500") == ("fe80::1", 29500)


def test_dry_run_plans_the_nodes_mesh(capsys):
    from serve import cli

    assert cli.main(["--dry-run", "--nnodes", "3", "--mesh", MESH, "--device-memory", "1GiB"]) == 2
    assert "8 devices do not split evenly over --nnodes 3" in capsys.readouterr().err
    args = cli.build_parser().parse_args(["--dry-run", "--nnodes", "2", "--mesh", MESH, "--device-memory", "1GiB"])
    cli._plan_nodes(args)
    assert capsys.readouterr().out.startswith("nodes: 2 x 4 devices (8 in the mesh)")


@pytest.fixture(scope="module")
def procs(tmp_path_factory):
    """Start everything at once (the machine is slow): the worker pair, the server pair, one server."""
    xdg = tmp_path_factory.mktemp("xdg")
    ckpt = builtin_checkpoint(str(xdg / "qwen3-jax"))
    env = {"XDG_CACHE_HOME": str(xdg), "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    out = str(tmp_path_factory.mktemp("workers"))
    addr = f"127.0.0.1:{free_port()}"
    workers = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "worker", str(r), addr, ckpt, out],
                                env={**os.environ, **env}, cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    # Rank 0 ends when its watchdog gives up on the frozen rank 1; its log and exit time are
    # taken when that happens, whichever test runs then.
    rank0_end: dict = {}

    def wait_rank0():
        try:
            rank0_end["log"], _ = workers[0].communicate(timeout=400)
        finally:
            rank0_end["at"] = time.time()
    waiter = threading.Thread(target=wait_rank0, name="worker-rank0", daemon=True)
    waiter.start()
    dist = ["--nnodes", "2", "--dist-init-addr", f"127.0.0.1:{free_port()}"]
    dist2 = ["--nnodes", "2", "--dist-init-addr", f"127.0.0.1:{free_port()}"]
    small = BASE + ["--mesh", "tp=2"]  # one device per process
    servers = {
        "single": ServerProcess(COMMON, env),
        "rank1": ServerProcess(COMMON + dist + ["--node-rank", "1"], env),
        "rank0": ServerProcess(COMMON + dist + ["--node-rank", "0"], env),
        "stop1": ServerProcess(small + dist2 + ["--node-rank", "1"], env),  # a second pair, to stop cleanly
        "stop0": ServerProcess(small + dist2 + ["--node-rank", "0"], env),
    }
    for s in servers.values():
        s.start()
    yield dict(workers=workers, out=out, ckpt=ckpt, waiter=waiter, rank0_end=rank0_end, **servers)
    for w in workers:
        if w.poll() is None:
            w.kill()
    for s in servers.values():
        try:
            s.stop(signal.SIGKILL, timeout=10)
        except RuntimeError:
            pass


@pytest.fixture(scope="module")
def worker_results(procs):
    rank0, rank1 = procs["workers"]
    procs["waiter"].join(timeout=420)  # rank 0 ends when its watchdog gives up on the frozen rank 1
    log0, gone_at = procs["rank0_end"].get("log") or "", procs["rank0_end"].get("at", time.time())
    rank1.kill()
    log1, _ = rank1.communicate(timeout=30)
    infos = []
    for r, log in enumerate((log0, log1)):
        path = os.path.join(procs["out"], f"rank{r}.json")
        assert os.path.exists(path), f"worker rank {r} wrote no results:\n{log[-3000:]}"
        infos.append(json.load(open(path)))
    return dict(infos=infos, logits=np.load(os.path.join(procs["out"], "logits.npy")), rc0=rank0.returncode,
                log0=log0, silent_s=gone_at - infos[1]["frozen_at"])


def _client(srv):
    return openai.OpenAI(base_url=srv.base_url + "/v1", api_key="none", max_retries=0, timeout=300)


def _complete(srv, prompt, **kw):
    r = _client(srv).completions.create(model=NAME, prompt=prompt, max_tokens=kw.pop("max_tokens", 16),
                                        extra_body={"ignore_eos": True}, **kw)
    return r.choices[0].text, r.usage.completion_tokens


@pytest.fixture(scope="module")
def servers(procs):
    procs["single"].wait_ready(600)
    procs["rank0"].wait_ready(600)
    assert procs["rank1"].proc.poll() is None, procs["rank1"].output()[-3000:]
    # One request before any concurrent ones: the openai client's pydantic response types are
    # built on first use, and many threads doing that first use at once can fail inside pydantic
    # ("BaseModel cannot be instantiated directly"; seen once with 16 threads)
    _complete(procs["single"], PROMPTS[0], max_tokens=1)
    return procs


def test_server_greedy_equals_single_process(servers):
    """Eight greedy requests at once (4 slots, prompts of 1 and 2 prefill chunks): same text."""
    def run(srv):
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            return list(pool.map(lambda p: _complete(srv, p, temperature=0), PROMPTS))

    with ThreadPoolExecutor(2) as pool:
        two, one = pool.map(run, (servers["rank0"], servers["single"]))
    assert all(n == 16 for _, n in two)
    assert two == one
    assert len({t for t, _ in two}) > 1  # the prompts really differ


def test_server_seeded_sampling_equals_single_process(servers):
    """Sampling state (temperature, top_p, top_k, seed, step) reaches rank 1 with each step. The
    text really is sampled: it differs from the greedy one and from another seed's."""
    kw = dict(temperature=0.9, top_p=0.95, seed=1234, max_tokens=12)
    sampled = _complete(servers["rank0"], PROMPTS[2], **kw)
    assert sampled == _complete(servers["single"], PROMPTS[2], **kw)
    assert sampled != _complete(servers["single"], PROMPTS[2], temperature=0, max_tokens=12)
    assert sampled != _complete(servers["single"], PROMPTS[2], **dict(kw, seed=4321))


@pytest.mark.parametrize("penalty,echo", [(0.0, False), (1.5, False), (1.5, True)])
def test_server_logprobs_and_penalties_equal_single_process(servers, penalty, echo):
    """A request with logprobs (and penalties: the counts live on every rank; and the echoed
    prompt's logprobs with a repetition penalty, the largest step message) runs those steps'
    variants on both ranks, announced like the others: the same tokens and logprobs as one
    process."""
    extra = {"ignore_eos": True, **({"repetition_penalty": 1.3} if echo else {})}

    def run(srv):
        r = _client(srv).completions.create(model=NAME, prompt=PROMPTS[3], max_tokens=12, temperature=0, logprobs=2,
                                            presence_penalty=penalty, echo=echo, extra_body=extra)
        return r.choices[0].logprobs

    two, one = run(servers["rank0"]), run(servers["single"])
    assert two.tokens == one.tokens and [t and t.keys() for t in two.top_logprobs] == [
        t and t.keys() for t in one.top_logprobs]
    skip = 1 if echo else 0   # an echoed prompt's first token has none
    assert two.token_logprobs[:skip] == one.token_logprobs[:skip] == [None] * skip
    np.testing.assert_allclose(two.token_logprobs[skip:], one.token_logprobs[skip:], rtol=0, atol=1e-5)


def test_server_structured_output_equals_single_process(servers):
    """A regex-constrained request: its mask rows travel with each step to rank 1 (the largest
    decode message: [B, V / 32] words); the same text as one process, and it matches."""
    def run(srv):
        return _client(srv).completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=12, temperature=0,
                                               extra_body={"regex": "[a-z]{2,6}( [a-z]{2,6}){1,2}"}).choices[0].text

    two = run(servers["rank0"])
    assert two == run(servers["single"]) and re.fullmatch("[a-z]{2,6}( [a-z]{2,6}){1,2}", two)


def test_rank1_killed_rank0_exits_naming_it(servers):
    rank0, rank1 = servers["rank0"], servers["rank1"]
    stream = _client(rank0).completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=200, temperature=0,
                                               stream=True, extra_body={"ignore_eos": True})
    got = 0
    for _ in stream:
        got += 1
        if got == 3:
            break
    t0 = time.monotonic()
    os.kill(rank1.proc.pid, signal.SIGKILL)
    try:
        for _ in stream:  # the stream must end (rank 0 exits), not hang
            pass
    except Exception:  # noqa: BLE001 - the connection drops when rank 0 exits
        pass
    rc = rank0.proc.wait(timeout=90)
    elapsed = time.monotonic() - t0
    out = rank0.output()
    assert rc != 0, out[-3000:]
    assert "lost node rank 1 of 2" in out, out[-3000:]
    assert elapsed < 60, f"rank 0 took {elapsed:.0f}s to notice rank 1 was gone"


def test_sigterm_stops_every_rank_cleanly(procs):
    """SIGTERM to rank 0 (what Ctrl-C or `scancel` does): rank 0 tells rank 1 to stop; both exit 0."""
    rank0, rank1 = procs["stop0"].wait_ready(600), procs["stop1"]
    assert _complete(rank0, PROMPTS[0], temperature=0, max_tokens=4)[1] == 4
    t0 = time.monotonic()
    assert rank0.stop(signal.SIGTERM, timeout=60) == 0, rank0.output()[-3000:]
    assert rank1.proc.wait(timeout=60) == 0, rank1.output()[-3000:]
    assert time.monotonic() - t0 < 30
    assert "rank 0 stopped after" in rank1.output()
    assert "lost node" not in rank0.output() + rank1.output()


# -- the worker pair (after the servers: rank 0 has waited out --dist-timeout by now) ---------
def test_two_processes_form_one_mesh(worker_results):
    infos = worker_results["infos"]
    assert [(i["rank"], i["processes"], i["devices"], i["local"]) for i in infos] == [(0, 2, 8, 4), (1, 2, 8, 4)]


def test_logits_equal_one_process(worker_results, procs):
    from qwen3_jax import api

    logits = worker_results["logits"]
    ref = api.load(procs["ckpt"], dtype="float32", progress=False).logits(TOKENS)  # one process, one device
    assert logits.shape == ref.shape == (2, 19, 576)
    rel = float(np.max(np.abs(logits - ref)) / np.max(np.abs(ref)))
    assert rel < 1e-5, f"2-process logits differ from one device by {rel:.2e} (relative)"
    assert (logits.argmax(-1) == ref.argmax(-1)).all()


def test_each_process_reads_only_its_slices(worker_results, procs):
    """Experts are split over the processes, so each reads half of them; nothing reads more than a
    single process loading the same mesh does (which reads every distinct slice once)."""
    from qwen3_jax import api
    from qwen3_jax.safetensors_io import SafetensorsCheckpoint

    infos = worker_results["infos"]
    counts, undo = count_reads()
    try:
        api.load(procs["ckpt"], mesh=MESH, dtype="float32", progress=False)  # one process, 8 devices
    finally:
        undo()
    ckpt = SafetensorsCheckpoint(procs["ckpt"])
    expert_elems = sum(int(np.prod(ckpt.shape(k))) for k in ckpt.keys() if ".mlp.experts." in k)
    assert counts["experts"] == expert_elems
    for info in infos:
        assert info["reads"]["experts"] == expert_elems // 2, info
        assert info["reads"]["other"] <= counts["other"], info


def test_silent_rank_is_lost_after_the_timeout(worker_results):
    """Rank 1 frozen: rank 0 exits 1 naming it, after --dist-timeout of silence (not never, not at once)."""
    assert worker_results["rc0"] == 1, worker_results["log0"][-3000:]
    assert "lost node rank 1 of 2 at 127.0.0.1:" in worker_results["log0"]
    assert f"no heartbeat for {SILENCE_S}s" in worker_results["log0"]
    assert SILENCE_S - 1 < worker_results["silent_s"] < SILENCE_S + 30, worker_results["silent_s"]


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "worker":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        raise SystemExit(worker(int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]))
    raise SystemExit("usage: python tests/test_multiprocess.py worker RANK HOST:PORT CHECKPOINT_DIR OUT_DIR")
