"""Where a mesh's batch-1 decode step goes, on every GPU and host thread (GPU only; runs 97-100 in NOTES.md).

serve.bench's profile reads the first GPU only. On a mesh at batch 1 that GPU spends much of a step
inside collectives (waiting for the other devices) or idle (waiting for launches). This traces one
multi-step decode call and prints, per GPU: kernels per step, busy time (the union of its kernels'
intervals, so overlapping streams count once), collective kernel time, idle; and per host thread:
events per step and the span they cover, to see which thread launches what and how fast.

    python benchmarks/mesh_timeline.py --mesh tp=2 --layers 8 [--model Qwen3-30B-A3B] [--batch 1]
"""

import argparse
import os
import sys
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax                                   # noqa: E402
import jax.numpy as jnp                      # noqa: E402

from qwen3_jax.api import random_model       # noqa: E402
from qwen3_jax.config import load_preset     # noqa: E402
from qwen3_jax.kernels.tune import profile_data   # noqa: E402
from serve.bench import fill_cache, make_decode   # noqa: E402

COLLECTIVE = ("nccl", "all-reduce", "all_reduce", "all-gather", "all_gather", "reduce-scatter", "psum")


def is_collective(name: str) -> bool:
    return any(c in name.lower() for c in COLLECTIVE)


def union_ns(intervals):
    """Total length of the union of [start, end) intervals."""
    total, end = 0, None
    for s, e in sorted(intervals):
        if end is None or s >= end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="Qwen3-30B-A3B")
    p.add_argument("--mesh", default="tp=2")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=6, help="host threads shown (most events first)")
    p.add_argument("--events", action="store_true", help="list one step's collectives per GPU (start+duration us)")
    p.add_argument("--names", type=int, default=8, help="event names shown per host thread (most time first)")
    args = p.parse_args()

    import dataclasses
    cfg = load_preset(args.model)
    cfg = dataclasses.replace(cfg, num_hidden_layers=args.layers)
    model = random_model(cfg, mesh=args.mesh, dtype="bfloat16", seed=0)
    cache = fill_cache(model.init_cache(args.batch, args.context), jax.random.key(0))
    tok = jnp.zeros((args.batch,), jnp.int32)
    pos = jnp.full((args.batch,), args.context - args.steps, jnp.int32)
    compiled = make_decode(model.graphdef, args.steps).lower(model.state, tok, pos, cache).compile()
    holder = {"cache": cache}

    def call():
        out, holder["cache"] = compiled(model.state, tok, pos, holder["cache"])
        return out

    for _ in range(3):
        jax.block_until_ready(call())
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        jax.block_until_ready(call())
        times.append(time.perf_counter() - t0)
    print(f"step {1e3 * sorted(times)[2] / args.steps:.3f} ms (median of 5 calls)")
    data = profile_data(call)
    s = args.steps
    print(f"{args.model} {args.layers} layers, mesh {args.mesh}, batch {args.batch}, {s} steps in one call")
    for plane in sorted(data.planes, key=lambda q: q.name):
        if plane.name.startswith("/device:GPU"):
            evs = [(ev.name, ev.start_ns, ev.start_ns + ev.duration_ns) for line in plane.lines
                   if line.name.startswith("Stream") for ev in line.events]
            if not evs:
                continue
            first, last = min(e[1] for e in evs), max(e[2] for e in evs)
            busy = union_ns([(a, b) for _, a, b in evs])
            coll = [(a, b) for n, a, b in evs if is_collective(n)]
            compute = union_ns([(a, b) for n, a, b in evs if not is_collective(n)])
            print(f"{plane.name}: {len(evs) / s:.0f} kernels/step, span {(last - first) / 1e3 / s:.0f} us/step, "
                  f"busy {busy / 1e3 / s:.0f}, compute {compute / 1e3 / s:.0f}, in collectives "
                  f"{union_ns(coll) / 1e3 / s:.0f} ({len(coll) / s:.0f}/step), idle {(last - first - busy) / 1e3 / s:.0f}")
            top = Counter()
            for n, a, b in evs:
                if is_collective(n):
                    top[n[:60]] += (b - a)
            for n, t in top.most_common(4):
                print(f"    {t / 1e3 / s:8.1f} us/step  {n}")
            if args.events:   # the collectives of the call's middle step, in order: start (us from the step's
                t0 = first + (last - first) * (s // 2) / s                 # nominal start) and duration
                mid = sorted((a, b, n) for n, a, b in evs if is_collective(n) and t0 <= a < t0 + (last - first) / s)
                print("    " + "; ".join(f"{(a - t0) / 1e3:.0f}+{(b - a) / 1e3:.0f} {n[:24]}" for a, b, n in mid))
        elif plane.name.startswith("/host"):
            lines = sorted(((ln.name, list(ln.events)) for ln in plane.lines), key=lambda t: -len(t[1]))
            for name, evs in lines[:args.threads]:
                if not evs:
                    continue
                first = min(e.start_ns for e in evs)
                last = max(e.start_ns + e.duration_ns for e in evs)
                names, spent = Counter(e.name[:50] for e in evs), Counter()
                for e in evs:
                    spent[e.name[:50]] += e.duration_ns
                print(f"{plane.name} thread '{name[:40]}': {len(evs) / s:.0f} events/step over "
                      f"{(last - first) / 1e3 / s:.0f} us/step; most time (us/step, count/step): "
                      + ", ".join(f"{n} {t / 1e3 / s:.0f} x{names[n] / s:.0f}" for n, t in spent.most_common(args.names)))


if __name__ == "__main__":
    main()
