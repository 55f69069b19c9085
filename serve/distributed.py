"""Several processes, one mesh: `python -m serve --nnodes N --node-rank R --dist-init-addr HOST:PORT`.

JAX's multi-controller runtime: every process (one per node) runs the same program over its own
devices, and one global mesh spans every process's devices. Each process loads only the slices
its devices hold (qwen3_jax.load reads the addressable shards only).

Only rank 0 serves HTTP and schedules. Its engine's jitted steps are wrapped so that before each
one runs, rank 0 broadcasts *which* step and its inputs (tokens, positions, slot, sampling
params, seeds and step counters: all the PRNG state there is) to every process; the other ranks
run the same compiled step on the same inputs, so every process enters the same collectives in
the same order:

    rank 0   scheduler -> announce(step, inputs) --+-- step(state, cache, *inputs)
    rank r   follow():    receive() ---------------+-- step(state, cache, *inputs)

The announcement is one fixed-shape int32 vector (header + payload; float32 inputs travel as
their bits), summed over one device per process with every rank but 0 adding zeros, so it is
exact and compiles once. When idle, rank 0 sends a no-op every 10 s (engine.KEEPALIVE_S), so no
rank waits in one collective for hours.

A dead peer cannot be seen through collectives (a collective with a dead peer blocks forever),
and JAX's own coordination service notices only after its heartbeat timeout and then aborts with
a crash dump. So a watchdog keeps one plain TCP connection from rank 0 to every other rank, with
a heartbeat byte each second, independent of JAX: a closed connection (the process died: crash,
OOM kill, SIGKILL) is seen at once, silence for --dist-timeout seconds (a node gone) soon after,
and the survivor prints which rank it lost and exits with status 1. Rank 0 exiting takes every
other rank down the same way; a lost rank r > 0 takes rank 0 down, and with it the rest.
"""

from __future__ import annotations

import argparse
import atexit
import inspect
import logging
import math
import os
import secrets
import signal
import socket
import struct
import sys
import threading
import time
from typing import Callable

import numpy as np

log = logging.getLogger("serve.distributed")

HEARTBEAT_S = 1.0
DEFAULT_TIMEOUT_S = 60      # --dist-timeout: silence after which a peer is declared lost
EXIT_PEER_LOST = 1

_MAGIC = b"Q3WD"
_HELLO = struct.Struct("!4sIQ")  # magic, rank, token
_BEAT, _BYE = b".", b"B"

# Step messages: [step id, sequence number, array count, per array (dtype, ndim, d0, d1, d2)] + payload.
MAX_ARRAYS = 16            # the engine's largest: a prompt-logprobs prefill with penalties and a mask, 15
HEADER = 96                # int32s, >= 3 + 5 * MAX_ARRAYS
STOP, NOOP = 0, 1           # step ids from 2 on name the engine's steps (sorted by name)
_DTYPES = (np.dtype(np.int32), np.dtype(np.float32), np.dtype(np.uint32))


class DistributedError(ValueError):
    """Bad multi-process flags, or a rank that cannot be reached; raised before serving."""


# -- flags ------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("several nodes (JAX distributed runtime; see README)")
    g.add_argument("--nnodes", metavar="N", type=int, default=1,
                   help="processes (one per node) that together hold the mesh; default 1")
    g.add_argument("--node-rank", metavar="R", type=int, default=0,
                   help="this process's rank in 0..N-1; rank 0 serves HTTP, the others follow its steps")
    g.add_argument("--dist-init-addr", metavar="HOST:PORT", default=None,
                   help="rank 0's address as every node reaches it, and a free port there for JAX's "
                        "coordination service (same value on every node)")
    g.add_argument("--dist-timeout", metavar="SECONDS", type=int, default=DEFAULT_TIMEOUT_S,
                   help="a node silent this long is declared lost and every node exits; a node whose "
                        f"process died is noticed at once (default {DEFAULT_TIMEOUT_S})")


def check_args(args, num_devices: int, need_addr: bool = True) -> None:
    """Validate --nnodes/--node-rank/--dist-init-addr against the mesh, before JAX starts.

    `need_addr` False (--dry-run) checks only how the mesh splits over the nodes.
    """
    n, r = args.nnodes, args.node_rank
    if n < 1:
        raise DistributedError(f"--nnodes must be at least 1, got {n}")
    if not 0 <= r < n:
        raise DistributedError(f"--node-rank {r} is not a rank of --nnodes {n}; use 0..{n - 1} (0 serves HTTP)")
    if n == 1:
        return
    if num_devices % n:
        raise DistributedError(f"the mesh's {num_devices} devices do not split evenly over --nnodes {n}; "
                               f"choose a mesh whose device count is a multiple of {n}")
    if not need_addr:
        return
    if not args.dist_init_addr:
        raise DistributedError(f"--nnodes {n} needs --dist-init-addr HOST:PORT, rank 0's address and a free port "
                               "(the same value on every node), e.g. --dist-init-addr 10.0.0.1:29500")
    split_addr(args.dist_init_addr)
    if args.dist_timeout < 2 * HEARTBEAT_S:
        raise DistributedError(f"--dist-timeout {args.dist_timeout} is shorter than two heartbeats "
                               f"({2 * HEARTBEAT_S:.0f}s); use 10 or more")


def split_addr(addr: str) -> tuple[str, int]:
    """'10.0.0.1:29500' / 'node01:29500' / '[fe80::1]:29500' -> (host, port)."""
    host, sep, port = addr.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DistributedError(f"--dist-init-addr {addr!r} is not HOST:PORT; write e.g. 10.0.0.1:29500")
    return host, int(port)


def local_device_count(num_devices: int, nnodes: int) -> int:
    """Devices each process contributes on CPU (simulated devices): the mesh split over the nodes."""
    return max(1, math.ceil(num_devices / nnodes))


def describe(args, num_devices: int) -> str:
    """E.g. 'nodes: 2 x 4 devices (this is rank 0 of 2, coordinator 10.0.0.1:29500)'."""
    return (f"nodes: {args.nnodes} x {num_devices // args.nnodes} devices (this is rank {args.node_rank} of "
            f"{args.nnodes}, coordinator {args.dist_init_addr})")


# -- start-up ---------------------------------------------------------------------------------
def initialize(args, num_devices: int) -> "Watchdog":
    """Join the JAX distributed runtime, then start the watchdog. Call before anything uses JAX.

    On CPU the collectives between processes go through gloo (TCP) and each process gets its share
    of the mesh as simulated devices; on GPU every local GPU joins (one process per node).
    """
    import jax

    from sharding.mesh import request_cpu_devices

    check_args(args, num_devices)
    host, _ = split_addr(args.dist_init_addr)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    request_cpu_devices(local_device_count(num_devices, args.nnodes))
    kw = dict(coordinator_address=args.dist_init_addr, num_processes=args.nnodes, process_id=args.node_rank)
    optional = dict(
        # Our watchdog reports a lost node first, with its rank; JAX's heartbeat stays the backstop.
        heartbeat_timeout_seconds=args.dist_timeout + 30,
        # A clean exit waits for every node at JAX's shutdown barrier; do not wait 5 minutes there.
        shutdown_timeout_seconds=30,
        # Under Slurm JAX would otherwise give each process one GPU; we run one process per node.
        cluster_detection_method="deactivate",
    )
    accepted = inspect.signature(jax.distributed.initialize).parameters
    kw.update({k: v for k, v in optional.items() if k in accepted})
    log.info("joining %d nodes as rank %d (coordinator %s)", args.nnodes, args.node_rank, args.dist_init_addr)
    t0 = time.perf_counter()
    try:
        jax.distributed.initialize(**kw)
    except Exception as e:  # unreachable coordinator, a rank that never came, a taken port
        raise DistributedError(
            f"node rank {args.node_rank} could not join the {args.nnodes} nodes at {args.dist_init_addr}: "
            f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}; start every rank with the "
            "same --nnodes and --dist-init-addr (rank 0's address as the others reach it, a free port)") from e
    log.info("joined: %d processes, %d devices (%d here, %s) in %.1fs", jax.process_count(), jax.device_count(),
             jax.local_device_count(), jax.local_devices()[0].platform, time.perf_counter() - t0)
    if jax.device_count() < num_devices:
        raise DistributedError(f"the mesh needs {num_devices} devices but the {args.nnodes} nodes have "
                               f"{jax.device_count()}; use a smaller mesh or more nodes")
    wd = Watchdog.start(args.node_rank, args.nnodes, host, args.dist_timeout)
    atexit.register(wd.close)  # registered after JAX's: runs first, so an ordinary exit is not "lost"
    return wd


# -- the watchdog -----------------------------------------------------------------------------
class Watchdog:
    """TCP heartbeats between rank 0 and every other rank, independent of JAX and its collectives.

    A peer whose connection closes without saying goodbye, or is silent for `timeout_s`, is lost:
    print which rank and why, then os._exit(1) (no clean shutdown: it would wait on the dead peer).
    """

    def __init__(self, rank: int, nnodes: int, timeout_s: float):
        self.rank, self.nnodes, self.timeout_s = rank, nnodes, timeout_s
        self.peers: dict[int, socket.socket] = {}
        self.addrs: dict[int, str] = {}
        self._leaving: set[int] = set()
        self._closing = False
        self._send_lock = threading.Lock()

    @classmethod
    def start(cls, rank: int, nnodes: int, host: str, timeout_s: float,
              connect_timeout_s: float = 120.0) -> "Watchdog":
        """Rank 0 listens on a free port and tells the others (a broadcast) where; they connect."""
        wd = cls(rank, nnodes, timeout_s)
        deadline = time.monotonic() + connect_timeout_s
        bcast = Broadcast(3)
        if rank == 0:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            server = socket.create_server(("", 0), family=family, backlog=max(nnodes, 8))
            token = secrets.randbits(62)
            bcast(np.array([server.getsockname()[1], token & 0x7FFFFFFF, token >> 31], np.int32))
            try:
                wd._accept(server, token, deadline)
            finally:
                server.close()
        else:
            port, lo, hi = (int(v) for v in bcast(np.zeros(3, np.int32)))
            wd._connect(host, port, lo | (hi << 31), deadline)
        for peer, sock in wd.peers.items():
            threading.Thread(target=wd._watch, args=(peer, sock), name=f"watchdog-rank{peer}", daemon=True).start()
        threading.Thread(target=wd._beat, name="watchdog-heartbeat", daemon=True).start()
        log.info("watchdog: connected to %s (heartbeat %.0fs, lost after %.0fs of silence)",
                 ", ".join(f"rank {p}" for p in sorted(wd.peers)), HEARTBEAT_S, timeout_s)
        return wd

    def _accept(self, server: socket.socket, token: int, deadline: float):
        port = server.getsockname()[1]
        while len(self.peers) < self.nnodes - 1:
            left = deadline - time.monotonic()
            missing = sorted(set(range(1, self.nnodes)) - set(self.peers))
            if left <= 0:
                raise DistributedError(f"node rank{'s' if len(missing) > 1 else ''} {missing} did not connect to "
                                       f"rank 0's watchdog on TCP port {port}; let the nodes reach each other on "
                                       "any TCP port (JAX's CPU collectives need that too)")
            server.settimeout(left)
            try:
                conn, addr = server.accept()
            except socket.timeout:
                continue
            conn.settimeout(10)
            try:
                magic, peer, got = _HELLO.unpack(_recv_exactly(conn, _HELLO.size))
            except (OSError, struct.error, ConnectionError):
                conn.close()
                continue
            if magic != _MAGIC or got != token or not 0 < peer < self.nnodes or peer in self.peers:
                conn.close()  # a stranger, or a stale process from another run: not one of ours
                continue
            conn.settimeout(None)
            self.peers[peer], self.addrs[peer] = conn, f"{addr[0]}:{addr[1]}"

    def _connect(self, host: str, port: int, token: int, deadline: float):
        while True:
            try:
                sock = socket.create_connection((host, port), timeout=10)
                break
            except OSError as e:
                if time.monotonic() > deadline:
                    raise DistributedError(f"node rank {self.rank} cannot reach rank 0's watchdog at {host}:{port} "
                                           f"({e.strerror or e}); let the nodes reach each other on any TCP port")
                time.sleep(0.5)
        sock.sendall(_HELLO.pack(_MAGIC, self.rank, token))
        sock.settimeout(None)
        self.peers[0], self.addrs[0] = sock, f"{host}:{port}"

    def _watch(self, peer: int, sock: socket.socket):
        sock.settimeout(self.timeout_s)
        while True:
            try:
                data = sock.recv(256)
            except socket.timeout:
                self._lost(peer, f"no heartbeat for {self.timeout_s:.0f}s (the node or its network is down)")
                return
            except OSError as e:
                self._lost(peer, f"its connection failed ({e.strerror or e})")
                return
            if not data:
                self._lost(peer, "its connection closed (the process exited or was killed)")
                return
            if _BYE in data:
                self._leaving.add(peer)

    def _beat(self):
        while not self._closing:
            for peer, sock in list(self.peers.items()):
                try:
                    with self._send_lock:
                        sock.sendall(_BEAT)
                except OSError as e:
                    self._lost(peer, f"sending to it failed ({e.strerror or e})")
            time.sleep(HEARTBEAT_S)

    def _lost(self, peer: int, why: str):
        if self._closing or peer in self._leaving:
            return
        where = f" at {self.addrs[peer]}" if peer in self.addrs else ""
        role = "rank 0 serves HTTP and schedules every step" if peer == 0 else "the mesh spans every node"
        msg = (f"error: node rank {self.rank} lost node rank {peer} of {self.nnodes}{where}: {why}; {role}, "
               "so this node cannot go on: exiting\n")
        try:
            sys.stdout.flush()
            sys.stderr.write(msg)
            sys.stderr.flush()
        finally:
            os._exit(EXIT_PEER_LOST)

    def close(self):
        """An orderly exit: tell the peers (so our closed connection is not a loss) and stop watching."""
        if self._closing:
            return
        self._closing = True
        for sock in self.peers.values():
            try:
                with self._send_lock:
                    sock.sendall(_BYE)
            except OSError:
                pass


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        part = sock.recv(n - len(buf))
        if not part:
            raise ConnectionError("closed during handshake")
        buf += part
    return buf


# -- the step broadcast -----------------------------------------------------------------------
class Broadcast:
    """Rank 0's int32 vector [size] to every process, through one device per process.

    A sum over the processes where every rank but 0 contributes zeros: exact for int32, one
    compiled all-reduce per size. Every process must call it, in the same order.
    """

    def __init__(self, size: int):
        import jax
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        first: dict[int, object] = {}
        for d in jax.devices():  # the same list, in the same order, on every process
            first.setdefault(d.process_index, d)
        devices = [first[p] for p in sorted(first)]
        mesh = Mesh(np.array(devices, dtype=object), ("process",))
        self.size, self.count = size, len(devices)
        self._device = first[jax.process_index()]
        self._rows = NamedSharding(mesh, PartitionSpec("process"))
        self._zeros = np.zeros((1, size), np.int32)
        self._sum = jax.jit(lambda x: x.sum(axis=0, dtype=np.int32), out_shardings=NamedSharding(mesh, PartitionSpec()))

    def __call__(self, values: np.ndarray) -> np.ndarray:
        import jax

        row = np.asarray(values, np.int32).reshape(1, self.size) if jax.process_index() == 0 else self._zeros
        local = jax.device_put(row, self._device)
        rows = jax.make_array_from_single_device_arrays((self.count, self.size), self._rows, [local])
        return np.asarray(self._sum(rows).addressable_data(0))


def pack(step_id: int, seq: int, arrays, size: int) -> np.ndarray:
    """A step message: int32 [size] = header (ids, each array's dtype and shape) + the arrays' bits."""
    arrays = [np.asarray(a) for a in arrays]
    if len(arrays) > MAX_ARRAYS:
        raise ValueError(f"a step message carries at most {MAX_ARRAYS} arrays, got {len(arrays)}")
    buf = np.zeros(size, np.int32)
    buf[:3] = step_id, seq, len(arrays)
    off = HEADER
    for i, a in enumerate(arrays):
        if a.dtype not in _DTYPES or a.ndim > 3:
            raise TypeError(f"step input {i} is {a.dtype}{list(a.shape)}; the broadcast carries int32, uint32 "
                            "and float32 arrays of up to 3 dimensions")
        buf[3 + 5 * i: 8 + 5 * i] = (_DTYPES.index(a.dtype), a.ndim, *a.shape, *(0,) * (3 - a.ndim))
        flat = np.ascontiguousarray(a).reshape(-1).view(np.int32)
        if off + flat.size > size:
            raise ValueError(f"step inputs need {off + flat.size} int32s, over the message size {size}")
        buf[off: off + flat.size] = flat
        off += flat.size
    return buf


def unpack(buf: np.ndarray) -> tuple[int, int, list[np.ndarray]]:
    """Inverse of pack -> (step id, sequence number, arrays), bit for bit."""
    step_id, seq, count = (int(v) for v in buf[:3])
    arrays, off = [], HEADER
    for i in range(count):
        code, ndim, *dims = (int(v) for v in buf[3 + 5 * i: 8 + 5 * i])
        shape = tuple(dims[:ndim])
        n = int(np.prod(shape, dtype=np.int64))
        arrays.append(buf[off: off + n].copy().view(_DTYPES[code]).reshape(shape))
        off += n
    return step_id, seq, arrays


class StepChannel:
    """Rank 0 announces each compiled step and its inputs; every other rank runs the same step.

    `capacity`: the most int32s of inputs one step carries (Engine: both token rows of the largest
    prefill bucket, or seven [slots] vectors of a decode step, plus the scalars).
    """

    def __init__(self, capacity: int):
        import jax

        self.rank, self.leader = jax.process_index(), jax.process_index() == 0
        self.size = HEADER + capacity
        self._bcast = Broadcast(self.size)
        self._seq = 0
        self._names: dict[str, int] = {}
        self._steps: dict[int, Callable] = {}
        self._running = None  # the last step's first output, until that step is known to be done
        self.stopped = False

    def attach(self, steps: dict[str, Callable]) -> dict[str, Callable]:
        """Register the engine's jitted steps, each `fn(state, cache, *inputs) -> (ids, cache)`.

        Rank 0 gets them back wrapped to announce themselves first; the others get them unchanged
        and run them from `follow`. Ids come from the sorted names, equal on every rank.
        """
        self._names = {name: STOP + 2 + i for i, name in enumerate(sorted(steps))}
        self._steps = {self._names[name]: fn for name, fn in steps.items()}
        if not self.leader:
            return dict(steps)
        return {name: self._announcing(self._names[name], fn) for name, fn in steps.items()}

    def _announcing(self, step_id: int, fn: Callable) -> Callable:
        def step(state, cache, *inputs):
            self._send(step_id, inputs)
            out = fn(state, cache, *inputs)
            self._running = out[0]
            return out
        return step

    def _finish_running(self):
        # XLA:CPU runs a step and a later broadcast concurrently when no data links them; their
        # collectives can share a communicator (the same device pair) and would then interleave.
        # So the previous step ends before the next announcement (rank 0 waits on it anyway).
        if self._running is not None:
            import jax
            jax.block_until_ready(self._running)
            self._running = None

    def _send(self, step_id: int, inputs):
        if self.stopped:
            raise RuntimeError("internal: a step after the followers were told to stop")
        self._finish_running()
        self._bcast(pack(step_id, self._seq, inputs, self.size))
        self._seq += 1

    def keepalive(self):
        """Rank 0, idle: a no-op so the followers do not sit in one collective indefinitely."""
        self._send(NOOP, ())

    def stop(self):
        """Rank 0: tell the followers to return from `follow` (idempotent)."""
        if self.leader and not self.stopped:
            self._send(STOP, ())
            self.stopped = True

    def receive(self) -> tuple[int, list[np.ndarray]]:
        """A follower: the next announced (step id, inputs)."""
        self._finish_running()
        step_id, seq, inputs = unpack(self._bcast(None))
        if seq != self._seq:
            raise RuntimeError(f"node rank {self.rank} expected step message {self._seq} from rank 0 but got {seq}: "
                               "the ranks ran different programs (same --model, --mesh and flags on every node?)")
        self._seq += 1
        return step_id, inputs

    def follow(self, run: Callable[[Callable, list[np.ndarray]], object]) -> int:
        """A follower: `run(step, inputs)` for each step rank 0 announces, until it says stop. -> steps run.

        `run` returns an output of the step (e.g. its sampled ids) to wait on before the next message.
        """
        steps = 0
        while True:
            step_id, inputs = self.receive()
            if step_id == STOP:
                self.stopped = True
                return steps
            if step_id == NOOP:
                continue
            if step_id not in self._steps:
                raise RuntimeError(f"rank 0 announced step {step_id}, which node rank {self.rank} does not have "
                                   f"({sorted(self._names)}): same --model, --mesh and flags on every node?")
            self._running = run(self._steps[step_id], inputs)
            steps += 1


def engine_capacity(num_slots: int, max_bucket: int, context_length: int, mask_words: int = 0) -> int:
    """int32s of inputs the engine's largest step carries (see StepChannel); mask_words: a
    structured-output mask row's int32 words (ceil(V / 32))."""
    # tokens, positions, prompt-logprob targets [1, T]; slot, logits_at, 8 sampling scalars (5 + 3
    # penalties); the prompt ids a repetition penalty flags [1, S]; a mask row
    prefill = 3 * max_bucket + 10 + context_length + mask_words
    decode = (10 + mask_words) * num_slots   # positions, 8 sampling vectors, the rows' slots, masks
    return max(prefill, decode)


def agree_min(value: int) -> int:
    """The smallest of every process's `value` (e.g. KV-cache slots each node's memory allows)."""
    import jax
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return int(value)
    return int(np.min(multihost_utils.process_allgather(np.array([value], np.int32))))


# -- a follower's main loop -------------------------------------------------------------------
def run_follower(engine, watchdog: Watchdog | None, grace_s: float = 10.0) -> int:
    """Run rank 0's steps until it stops us. -> exit status.

    The steps run on a thread, so SIGTERM/SIGINT reach Python while a collective blocks: then we
    wait up to `grace_s` for rank 0's stop (under Slurm every node gets the signal at once and
    rank 0 stops everyone in order), else exit 1 (rank 0 then loses this rank and exits too).
    """
    done = threading.Event()
    result: dict[str, object] = {}

    def body():
        try:
            result["steps"] = engine.follow()
        except BaseException as e:  # noqa: BLE001 - reported below
            result["error"] = e
        finally:
            done.set()

    signalled: list[float] = []

    def on_signal(signum, frame):
        if not signalled:
            log.info("node rank %d: %s; waiting up to %.0fs for rank 0 to stop", engine_rank(),
                     signal.Signals(signum).name, grace_s)
            signalled.append(time.monotonic())

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    threading.Thread(target=body, name="follower", daemon=True).start()
    try:
        while not done.wait(0.2):
            if signalled and time.monotonic() - signalled[0] > grace_s:
                sys.stderr.write(f"error: node rank {engine_rank()} was signalled and rank 0 did not stop within "
                                 f"{grace_s:.0f}s; exiting (rank 0 will lose this node and stop too)\n")
                sys.stderr.flush()
                os._exit(EXIT_PEER_LOST)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if "error" in result:
        log.error("node rank %d: following rank 0 failed: %r", engine_rank(), result["error"])
        return 1
    if watchdog is not None:
        watchdog.close()
    log.info("node rank %d: rank 0 stopped after %d steps here", engine_rank(), result.get("steps", 0))
    return 0


def engine_rank() -> int:
    import jax

    return jax.process_index()
