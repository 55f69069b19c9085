"""Mesh specs: `--mesh tp=4,ep=8` to one device mesh that attention and MoE layers both use.

Semantics (as in SGLang and vLLM): the spec names N = dp x tp devices. Attention sees them as
data(dp) x tensor(tp); MoE layers see the same N devices as expert(ep) x expert_tensor(N/ep).
`tp=4,ep=8` is 8 devices, not 32: experts re-use the attention devices. `dp` defaults to
ep/tp when ep > tp, else 1; `ep` omitted is 1 (each expert split N ways over its intermediate).

Both views are row-major over one device list, so one three-axis mesh serves both:

    ep >= dp:  (outer, middle, inner) = (dp, ep/dp, N/ep)
               data = outer; tensor = middle x inner; expert = outer x middle; expert_tensor = inner
    ep <  dp:  (outer, middle, inner) = (ep, dp/ep, tp)
               data = outer x middle; tensor = inner; expert = outer; expert_tensor = middle x inner

That needs dp and ep to divide one another (data groups nest inside expert groups or the other
way round). Device p of the list has data rank p // tp, tensor rank p % tp, expert rank
p // (N/ep) and expert-tensor rank p % (N/ep).

Every check here runs on sizes alone, before any device memory is touched, and every error
names the numbers and suggests specs computed to be valid (`valid_specs`), not guessed.
"""

from __future__ import annotations

import dataclasses
import math
import re

MESH_AXES = ("outer", "middle", "inner")
SPEC_KEYS = ("dp", "tp", "ep")


class MeshSpecError(ValueError):
    """An invalid --mesh spec, raised before any device memory is touched."""


@dataclasses.dataclass(frozen=True)
class MeshSpec:
    """A resolved mesh: sizes of the attention and MoE views over the same N devices."""

    dp: int
    tp: int
    ep: int

    @property
    def num_devices(self) -> int:
        return self.dp * self.tp

    @property
    def etp(self) -> int:
        """Expert-tensor size: how many ways each expert's intermediate dim is split."""
        return self.num_devices // self.ep

    @property
    def shape(self) -> tuple[int, int, int]:
        n = self.num_devices
        if self.ep >= self.dp:
            return (self.dp, self.ep // self.dp, n // self.ep)
        return (self.ep, self.dp // self.ep, self.tp)

    @property
    def axes(self) -> dict[str, tuple[str, ...]]:
        """Mesh axes of each view: 'data', 'tensor', 'expert', 'expert_tensor'."""
        if self.ep >= self.dp:
            return {"data": ("outer",), "tensor": ("middle", "inner"),
                    "expert": ("outer", "middle"), "expert_tensor": ("inner",)}
        return {"data": ("outer", "middle"), "tensor": ("inner",),
                "expert": ("outer",), "expert_tensor": ("middle", "inner")}

    def describe(self) -> str:
        """One line, e.g. 'mesh: 8 devices | attention data=2 x tensor=4 | moe expert=8 x tensor=1'."""
        return (f"mesh: {self.num_devices} device{'s' if self.num_devices > 1 else ''} | attention "
                f"data={self.dp} x tensor={self.tp} | moe expert={self.ep} x tensor={self.etp}")

    def __str__(self) -> str:
        """The shortest spec string that parses back to this mesh (dp only when not the default)."""
        parts = []
        if self.dp != _default_dp(self.tp, self.ep):
            parts.append(f"dp={self.dp}")
        if self.tp != 1:
            parts.append(f"tp={self.tp}")
        if self.ep != 1:
            parts.append(f"ep={self.ep}")
        return ",".join(parts) or "tp=1"


def _default_dp(tp: int, ep: int) -> int:
    return ep // tp if ep > tp else 1


_TERM = re.compile(r"^(dp|tp|ep)=(-?\d+)$")
# Near misses we can repair in a suggestion: 'TP=4', 'tp4', 'tp:4', 'tp = 4'.
_LOOSE_TERM = re.compile(r"^(dp|tp|ep)\s*[:=]?\s*(\d+)$", re.IGNORECASE)


def parse_mesh_spec(spec: str | MeshSpec | None, num_devices: int | None = None, cfg=None) -> MeshSpec:
    """'tp=4,ep=8' -> MeshSpec(dp=2, tp=4, ep=8). None or '' is one device.

    `num_devices`, when given, is how many devices the user wants the spec to span (for
    `tp=2` on 8 devices that means dp=4); otherwise the spec's own product is used.
    Raises MeshSpecError for malformed terms, duplicate or zero sizes, and sizes that do not
    fit together (ep must divide N = dp x tp; dp and ep must divide one another). With `cfg`
    (a model config) the specs an error suggests are also valid for that model; the model's
    own checks are check_against_config's.
    """
    if isinstance(spec, MeshSpec):
        return spec
    text = spec or ""
    sizes: dict[str, int] = {}
    for raw in text.split(","):
        term = raw.strip()
        if not term:
            continue
        m = _TERM.match(term.replace(" ", ""))
        if not m:
            raise MeshSpecError(_malformed_term_message(term, text, cfg))
        key, value = m.group(1), int(m.group(2))
        if key in sizes:
            raise MeshSpecError(
                f"{key} is given twice in mesh spec {text!r} ({key}={sizes[key]} and {key}={value}); "
                f"give each of dp, tp, ep at most once, "
                f"{_repair(_replace_term(text, key, sizes[key]), cfg)}")
        if value < 1:
            raise MeshSpecError(
                f"{key}={value} in mesh spec {text!r}: sizes count devices and must be >= 1; "
                f"leave {key} out for 1, {_repair(_replace_term(text, key, None) or 'tp=1', cfg)}")
        sizes[key] = value
    tp, ep = sizes.get("tp", 1), sizes.get("ep", 1)
    if "dp" in sizes:
        dp = sizes["dp"]
    elif num_devices is not None:
        if num_devices % tp:
            ok = _divisors(num_devices)
            raise MeshSpecError(
                f"{num_devices} devices cannot be split into tensor groups of tp={tp} "
                f"({num_devices} % {tp} = {num_devices % tp}); tp must be one of {ok}: "
                + _try(_pick([], MeshSpec(max(1, num_devices // tp), tp, ep), cfg, num_devices), num_devices))
        dp = num_devices // tp
    else:
        dp = _default_dp(tp, ep)
        if ep > tp and ep % tp:
            lo, hi = tp * (ep // tp), tp * -(-ep // tp)
            near = [MeshSpec(lo // tp, tp, lo), MeshSpec(hi // tp, tp, hi)]
            raise MeshSpecError(
                f"ep={ep} is not a multiple of tp={tp}: with dp omitted the mesh has ep/tp = {ep}/{tp} "
                f"data-parallel groups, which is not a whole number; give dp or "
                + _try(_pick(near, MeshSpec(max(1, ep // tp), tp, ep), cfg, hi)))
    n = dp * tp
    want = MeshSpec(dp, tp, ep)
    if n % ep:
        ok = [e for e in _divisors(n) if e % dp == 0 or dp % e == 0]
        raise MeshSpecError(
            f"ep={ep} does not divide the {n} devices of {text!r} (dp={dp} x tp={tp}); the MoE spans "
            f"all {n} devices as ep x (each expert's intermediate split), so ep must be one of {ok}: "
            + _try(_pick([MeshSpec(dp, tp, e) for e in ok], want, cfg, n), n))
    if ep % dp and dp % ep:
        near = [MeshSpec(dp, tp, e) for e in _divisors(n) if e % dp == 0 or dp % e == 0]
        near += [MeshSpec(n // t, t, ep) for t in _divisors(n) if ep % (n // t) == 0 or (n // t) % ep == 0]
        raise MeshSpecError(
            f"dp={dp} and ep={ep} must divide one another (neither {dp} % {ep} nor {ep} % {dp} is 0), so "
            f"attention's data groups nest inside the expert groups or the other way round, on the "
            f"{n} devices of {text!r}; " + _try(_pick(near, want, cfg, n), n))
    return want


def _pick(candidates: list[MeshSpec], want: MeshSpec, cfg, max_devices: int) -> list[MeshSpec]:
    """The best 3 of `candidates` the model allows, or, if none, of every valid spec that fits."""
    ok = [c for c in candidates if cfg is None or config_problem(c, cfg) is None]
    return _rank(ok, want)[:3] if ok else suggest_specs(cfg, want, max_devices)


def _repair(fixed: str, cfg) -> str:
    """'e.g. --mesh <fixed>' when the repaired spec is valid (for the model too), else a valid one."""
    try:
        spec = parse_mesh_spec(fixed, cfg=cfg)
    except MeshSpecError:
        return "e.g. --mesh tp=1"
    if cfg is None or config_problem(spec, cfg) is None:
        return f"e.g. --mesh {fixed}"
    best = suggest_specs(cfg, spec, spec.num_devices)
    return f"e.g. --mesh {best[0]}" if best else "e.g. --mesh tp=1"


def _malformed_term_message(term: str, text: str, cfg) -> str:
    loose = _LOOSE_TERM.match(term)
    if loose:
        fixed = f"{loose.group(1).lower()}={loose.group(2)}"
        hint = f"did you mean {fixed!r}? {_repair(text.replace(term, fixed).replace(' ', ''), cfg)}"
    else:
        key = term.split("=", 1)[0].strip()
        if "=" in term and key.lower() not in SPEC_KEYS:
            hint = (f"{key!r} is not a mesh axis; the axes are dp (attention data parallel), tp (tensor "
                    f"parallel) and ep (expert parallel), {_repair('tp=4,ep=8', cfg)}")
        else:
            hint = f"write terms like 'tp=4', 'ep=8', 'dp=2' separated by commas, {_repair('tp=4,ep=8', cfg)}"
    return f"cannot parse mesh term {term!r} in {text!r}; {hint}"


def _replace_term(text: str, key: str, value: int | None) -> str:
    """`text` with only the first `key` term kept, set to `value` (or dropped when None)."""
    out, seen = [], False
    for raw in text.split(","):
        term = raw.strip().replace(" ", "")
        if not term:
            continue
        if term.startswith(key + "="):
            if seen:
                continue
            seen = True
            if value is None:
                continue
            term = f"{key}={value}"
        out.append(term)
    return ",".join(out)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# -- checks against a model config -------------------------------------------------------------

def config_problem(mesh: MeshSpec, cfg) -> str | None:
    """Why the model's sizes cannot be split over `mesh` (first reason, with the numbers), or None."""
    tp, ep, etp, n = mesh.tp, mesh.ep, mesh.etp, mesh.num_devices
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    if heads % tp:
        return (f"num_attention_heads={heads} is not divisible by tp={tp} ({heads} % {tp} = {heads % tp}): "
                f"each tensor rank must hold whole query heads")
    if kv % tp and tp % kv:
        if tp > kv:
            return (f"tp={tp} exceeds num_key_value_heads={kv} but is not a multiple of it "
                    f"({tp} % {kv} = {tp % kv}), so KV heads cannot be replicated evenly")
        return (f"num_key_value_heads={kv} is not divisible by tp={tp} ({kv} % {tp} = {kv % tp}), "
                f"so KV heads cannot be split evenly")
    moe = any(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    if moe and cfg.num_experts % ep:
        return (f"num_experts={cfg.num_experts} is not divisible by ep={ep} "
                f"({cfg.num_experts} % {ep} = {cfg.num_experts % ep})")
    if moe and cfg.moe_intermediate_size % etp:
        f = cfg.moe_intermediate_size
        return (f"moe_intermediate_size={f} is not divisible by its split {etp} "
                f"(= {n} devices / ep={ep}; {f} % {etp} = {f % etp}): each expert's intermediate dim "
                f"is split N/ep ways")
    dense = any(not cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    if dense and cfg.intermediate_size % tp:
        i = cfg.intermediate_size
        return (f"intermediate_size={i} (dense MLP layers) is not divisible by tp={tp} "
                f"({i} % {tp} = {i % tp})")
    if cfg.vocab_size % tp:
        v = cfg.vocab_size
        return f"vocab_size={v} is not divisible by tp={tp} ({v} % {tp} = {v % tp}): embeddings split by vocab"
    return None


def check_against_config(mesh: MeshSpec, cfg) -> None:
    """Refuse a mesh the model's sizes cannot be split over; the message suggests valid specs."""
    problem = config_problem(mesh, cfg)
    if problem:
        best = suggest_specs(cfg, mesh, mesh.num_devices)
        raise MeshSpecError(f"mesh {mesh} ({mesh.num_devices} devices) does not fit {_model_name(cfg)}: "
                            f"{problem}; {_try(best, mesh.num_devices)}")


def valid_specs(cfg, num_devices: int) -> list[MeshSpec]:
    """Every spec of exactly `num_devices` devices that the model's sizes allow (cfg None: any)."""
    n = num_devices
    out = []
    for tp in _divisors(n):
        dp = n // tp
        for ep in _divisors(n):
            if ep % dp and dp % ep:
                continue
            spec = MeshSpec(dp, tp, ep)
            if cfg is None or config_problem(spec, cfg) is None:
                out.append(spec)
    return out


def suggest_specs(cfg, want: MeshSpec, max_devices: int, count: int = 3) -> list[MeshSpec]:
    """Up to `count` valid specs on at most `max_devices` devices, closest to `want` first.

    Prefers the most devices (all of them when possible), then the fewest changed sizes.
    """
    for n in range(max_devices, 0, -1):
        found = valid_specs(cfg, n)
        if found:
            return _rank(found, want)[:count]
    return []


def _rank(specs: list[MeshSpec], want: MeshSpec) -> list[MeshSpec]:
    def distance(s: MeshSpec):
        changed = (s.tp != want.tp) + (s.ep != want.ep) + (s.dp != want.dp)
        return (changed, abs(math.log2(s.tp / want.tp)) + abs(math.log2(s.ep / want.ep)), -s.ep, -s.tp)
    unique = list(dict.fromkeys(specs))
    return sorted(unique, key=distance)


def _try(specs: list[MeshSpec], num_devices: int | None = None) -> str:
    """'try --mesh A (also valid: --mesh B, --mesh C)', with device counts where they differ from N."""
    if not specs:
        return "no split of this model fits on that many devices; use --mesh tp=1 (one device)"

    def one(s: MeshSpec) -> str:
        n = s.num_devices
        return f"--mesh {s}" + ("" if n == num_devices else f" ({n} device{'s' if n > 1 else ''})")

    also = f" (also valid: {', '.join(one(s) for s in specs[1:])})" if len(specs) > 1 else ""
    return f"try {one(specs[0])}{also}"


def _model_name(cfg) -> str:
    return f"model {getattr(cfg, 'name', 'qwen3_moe')!r}"


def kv_replication(mesh: MeshSpec, cfg) -> int:
    """How many copies of each KV head the mesh needs so every tensor rank holds one (tp > kv heads)."""
    kv = cfg.num_key_value_heads
    return mesh.tp // kv if mesh.tp > kv else 1


def request_cpu_devices(n: int, env: dict | None = None, *, configure_jax: bool = True) -> None:
    """Ask XLA's CPU platform for n simulated devices: the XLA_FLAGS device count in `env`
    (default os.environ; any earlier count replaced) and, when configure_jax, JAX's
    jax_num_cpu_devices. Effective only before JAX starts its backends (or in a child process
    given `env`); GPU platforms are not affected."""
    import os

    env = os.environ if env is None else env
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")).split()
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])
    if configure_jax:
        import jax
        try:
            jax.config.update("jax_num_cpu_devices", n)
        except Exception:  # JAX without the option, or backends already up: XLA_FLAGS does it
            pass


def make_mesh(mesh: MeshSpec, devices=None, cfg=None):
    """The jax Mesh (Auto axis types) over the first N devices; too few devices is an error.

    `cfg`, when given, makes the too-few-devices message suggest specs valid for that model.
    """
    import jax
    import numpy as np
    from jax.sharding import Mesh

    devices = list(jax.devices() if devices is None else devices)
    n = mesh.num_devices
    if len(devices) < n:
        platform = devices[0].platform if devices else "none"
        best = suggest_specs(cfg, mesh, len(devices)) if devices else []
        raise MeshSpecError(f"mesh {mesh} needs {n} devices but only {len(devices)} are visible ({platform}); "
                            f"{_try(best)} or run on more devices")
    grid = np.array(devices[:n], dtype=object).reshape(mesh.shape)
    try:
        from jax.sharding import AxisType
        return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    except (ImportError, TypeError):
        return Mesh(grid, MESH_AXES)
