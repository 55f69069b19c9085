"""Hugging Face Qwen3-MoE safetensors -> our stacked, sharded params.

Each of our params is a *view* on checkpoint tensors: e.g. q_proj W[D, H, Q] is HF's
`q_proj.weight` [H*Q, D] transposed and reshaped, experts gate W[E, D, F] stacks E HF tensors
[F, D]. Views are lazy numpy views of memory-mapped files, so a device's shard is copied out
of the file without ever building the whole tensor on the host, and the sharded array for one
layer is put on the devices with `jax.make_array_from_callback`.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Callable

import numpy as np

from .config import Qwen3MoeConfig
from . import fp8 as fp8_format
from .fp8 import kind_kept_unquantized
from .safetensors_io import CheckpointError, SafetensorsCheckpoint

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class HfTensor:
    """How one of our per-layer params is made from HF tensors.

    `names(layer)` lists HF tensor names (several = stacked experts along our axis 0);
    `to_ours(array)` maps one HF array (weight or expanded scale) to our per-layer layout
    (the model dim written as -1 so the same transform serves block scales);
    `hf_shape` is the HF shape of each; `d_is_input` says which HF axis holds the model dim;
    `kv_axis` is our axis to repeat for KV-head replication; `fp8_to_ours` and `fp8_kv_axis`,
    where given, replace `to_ours` and `kv_axis` for an FP8 weight (not its scale): the model
    keeps FP8 experts and attention weights in HF's [out, in] order (model.Weight's nk), only
    reshaped.
    """

    names: Callable[[int | None], list[str]]
    hf_shape: tuple[int, ...]
    to_ours: Callable[[np.ndarray], np.ndarray]
    d_is_input: bool = True
    kv_axis: int | None = None
    quantizable: bool = False
    stacked: bool = False  # names() gives one tensor per expert, stacked on our axis 0
    fp8_to_ours: Callable[[np.ndarray], np.ndarray] | None = None
    fp8_kv_axis: int | None = None


def param_sources(cfg: Qwen3MoeConfig) -> dict[tuple, HfTensor]:
    """Our param path (segment kind, module, name) -> how to read it. Layer paths use 'L'."""
    d, h, k, q = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    e, f, i, v = cfg.num_experts, cfg.moe_intermediate_size, cfg.intermediate_size, cfg.vocab_size
    lp = "model.layers.{}."

    def one(name):
        return lambda layer: [name.format(layer)]

    nk = fp8_format.NK_ORDER

    def fp8_order(fn):   # the FP8 weight's transform where the model stores [out, in] (fp8.NK_ORDER)
        return fn if nk else None

    src = {
        ("embed",): HfTensor(one("model.embed_tokens.weight"), (v, d), lambda w: w),
        ("final_norm",): HfTensor(one("model.norm.weight"), (d,), lambda w: w),
        ("lm_head",): HfTensor(one("lm_head.weight"), (v, d), lambda w: w.T),
        ("L", "input_norm"): HfTensor(one(lp + "input_layernorm.weight"), (d,), lambda w: w),
        ("L", "post_norm"): HfTensor(one(lp + "post_attention_layernorm.weight"), (d,), lambda w: w),
        ("L", "attn", "q_norm"): HfTensor(one(lp + "self_attn.q_norm.weight"), (q,), lambda w: w),
        ("L", "attn", "k_norm"): HfTensor(one(lp + "self_attn.k_norm.weight"), (q,), lambda w: w),
        ("L", "attn", "q_proj"): HfTensor(one(lp + "self_attn.q_proj.weight"), (h * q, d),
                                          lambda w: w.T.reshape(-1, h, q), quantizable=True,
                                          fp8_to_ours=fp8_order(lambda w: w.reshape(h, q, -1))),
        ("L", "attn", "k_proj"): HfTensor(one(lp + "self_attn.k_proj.weight"), (k * q, d),
                                          lambda w: w.T.reshape(-1, k, q), kv_axis=1, quantizable=True,
                                          fp8_to_ours=fp8_order(lambda w: w.reshape(k, q, -1)), fp8_kv_axis=0),
        ("L", "attn", "v_proj"): HfTensor(one(lp + "self_attn.v_proj.weight"), (k * q, d),
                                          lambda w: w.T.reshape(-1, k, q), kv_axis=1, quantizable=True,
                                          fp8_to_ours=fp8_order(lambda w: w.reshape(k, q, -1)), fp8_kv_axis=0),
        ("L", "attn", "o_proj"): HfTensor(one(lp + "self_attn.o_proj.weight"), (d, h * q),
                                          lambda w: w.T.reshape(h, q, -1), d_is_input=False, quantizable=True,
                                          fp8_to_ours=fp8_order(lambda w: w.reshape(-1, h, q))),
        ("L", "attn", "q_bias"): HfTensor(one(lp + "self_attn.q_proj.bias"), (h * q,), lambda w: w.reshape(h, q)),
        ("L", "attn", "k_bias"): HfTensor(one(lp + "self_attn.k_proj.bias"), (k * q,),
                                          lambda w: w.reshape(k, q), kv_axis=0),
        ("L", "attn", "v_bias"): HfTensor(one(lp + "self_attn.v_proj.bias"), (k * q,),
                                          lambda w: w.reshape(k, q), kv_axis=0),
        ("L", "attn", "o_bias"): HfTensor(one(lp + "self_attn.o_proj.bias"), (d,), lambda w: w),
        ("moe", "router"): HfTensor(one(lp + "mlp.gate.weight"), (e, d), lambda w: w.T),
        ("dense", "gate_proj"): HfTensor(one(lp + "mlp.gate_proj.weight"), (i, d), lambda w: w.T, quantizable=True),
        ("dense", "up_proj"): HfTensor(one(lp + "mlp.up_proj.weight"), (i, d), lambda w: w.T, quantizable=True),
        ("dense", "down_proj"): HfTensor(one(lp + "mlp.down_proj.weight"), (d, i), lambda w: w.T,
                                         d_is_input=False, quantizable=True),
    }
    for proj, shape, d_in in (("gate_proj", (f, d), True), ("up_proj", (f, d), True), ("down_proj", (d, f), False)):
        src[("moe", proj)] = HfTensor(
            lambda layer, p=proj: [f"model.layers.{layer}.mlp.experts.{x}.{p}.weight" for x in range(e)],
            shape, lambda w: w.T, d_is_input=d_in, quantizable=True, stacked=True, fp8_to_ours=fp8_order(lambda w: w))
    return src


def source_key(path: tuple, segment_kinds: list[str]) -> tuple[tuple, bool]:
    """An nnx state path -> (param_sources key, is_scale).

    ('segments', 0, 'block', 'attn', 'q_proj', 'w') -> (('L', 'attn', 'q_proj'), False);
    ('segments', 1, 'block', 'mlp', 'up_proj', 'scale') -> (('moe', 'up_proj'), True).
    """
    leaf = path[-1]
    owner = tuple(path[:-1])
    if owner[0] == "segments":
        rest = owner[3:]
        key = (segment_kinds[owner[1]], rest[1]) if rest[0] == "mlp" else ("L", *rest)
    else:
        key = owner
    return key, leaf == "scale"


class LayerReader:
    """Reads our per-layer arrays (or any device's slice of them) from a checkpoint."""

    def __init__(self, ckpt: SafetensorsCheckpoint, cfg: Qwen3MoeConfig, kv_rep: int):
        self.ckpt, self.cfg, self.kv_rep = ckpt, cfg, kv_rep

    def view(self, src: HfTensor, layer: int | None, scale: bool, target_dtype) -> "LazyView":
        names = src.names(layer)
        views = [self._one(src, n, scale, target_dtype) for n in names]
        stored_nk = not scale and _is_fp8(target_dtype) and src.fp8_to_ours is not None
        return LazyView(views, stacked=src.stacked, kv_axis=src.fp8_kv_axis if stored_nk else src.kv_axis,
                        kv_rep=self.kv_rep)

    def _one(self, src: HfTensor, name: str, scale: bool, target_dtype):
        ckpt, fp8 = self.ckpt, self.cfg.fp8
        if scale:
            s = ckpt.array(name + "_scale_inv").astype(np.float32)
            w_shape = ckpt.shape(name)
            if src.d_is_input:  # HF [out, D]: expand out blocks to elements
                s = np.repeat(s, fp8.block_out, axis=0)[: w_shape[0]]
            else:               # HF [D, in]
                s = np.repeat(s, fp8.block_in, axis=1)[:, : w_shape[1]]
            return src.to_ours(s)
        w = ckpt.array(name)
        if _is_fp8(target_dtype) and src.fp8_to_ours is not None:
            return src.fp8_to_ours(w)
        if _is_fp8(w.dtype) and not _is_fp8(target_dtype):
            # Stored FP8 but kept unquantized here (modules_to_not_convert): dequantize on the host.
            from .fp8 import dequantize_blocks
            w = dequantize_blocks(w, ckpt.array(name + "_scale_inv"), (fp8.block_out, fp8.block_in))
        return src.to_ours(w)


def _is_fp8(dtype) -> bool:
    return "float8" in str(np.dtype(dtype))


class LazyView:
    """Our-layout array that materializes only the requested slice."""

    def __init__(self, views, stacked: bool, kv_axis: int | None, kv_rep: int):
        self.views, self.stacked, self.kv_axis, self.kv_rep = views, stacked, kv_axis, kv_rep

    @property
    def shape(self):
        base = list(self.views[0].shape)
        if self.kv_axis is not None:
            base[self.kv_axis] *= self.kv_rep
        return (len(self.views), *base) if self.stacked else tuple(base)

    def __getitem__(self, index) -> np.ndarray:
        index = tuple(index)
        if self.stacked:
            picked = range(len(self.views))[index[0]]
            # Filled expert by expert: the host holds the stacked slice once, not also a list of
            # per-expert copies (np.stack would double the peak of the largest tensor we read).
            out = None
            for i, j in enumerate(picked):
                part = self._slice(self.views[j], index[1:])
                if out is None:
                    out = np.empty((len(picked), *part.shape), part.dtype)
                out[i] = part
            return out
        return self._slice(self.views[0], index)

    def _slice(self, v, index):
        if self.kv_axis is not None and self.kv_rep > 1:
            sl = index[self.kv_axis]
            rows = np.arange(v.shape[self.kv_axis] * self.kv_rep)[sl] // self.kv_rep
            index = tuple(rows if a == self.kv_axis else s for a, s in enumerate(index))
        return np.array(v[index])


def expected_tensors(cfg: Qwen3MoeConfig, fp8_kinds: dict[tuple, bool]) -> dict[str, tuple]:
    """Every HF tensor name the config implies -> expected shape (scales included for FP8 kinds)."""
    from .fp8 import expected_scale_shape

    src = param_sources(cfg)
    out: dict[str, tuple] = {}

    def add(key, layer):
        s = src[key]
        for n in s.names(layer):
            out[n] = s.hf_shape
            if fp8_kinds.get(key):
                out[n + "_scale_inv"] = expected_scale_shape(s.hf_shape, (cfg.fp8.block_out, cfg.fp8.block_in))

    add(("embed",), None)
    add(("final_norm",), None)
    if not cfg.tie_word_embeddings:
        add(("lm_head",), None)
    attn = ["input_norm", "post_norm"]
    for layer in range(cfg.num_hidden_layers):
        for key in [("L", n) for n in attn] + [("L", "attn", n) for n in ("q_norm", "k_norm", "q_proj", "k_proj",
                                                                          "v_proj", "o_proj")]:
            add(key, layer)
        if cfg.attention_bias:
            for n in ("q_bias", "k_bias", "v_bias", "o_bias"):
                add(("L", "attn", n), layer)
        kind = "moe" if cfg.is_moe_layer(layer) else "dense"
        for n in (("router",) if kind == "moe" else ()) + ("gate_proj", "up_proj", "down_proj"):
            add((kind, n), layer)
    return out


def validate_checkpoint(ckpt: SafetensorsCheckpoint, cfg: Qwen3MoeConfig) -> None:
    """Missing, extra and mis-shaped tensors, each named with its file, before anything is loaded."""
    quantized = {k: s.quantizable and cfg.fp8 is not None for k, s in param_sources(cfg).items()}
    expected = expected_tensors(cfg, {k: False for k in quantized})
    present = set(ckpt.keys())
    missing = [n for n in expected if n not in present]
    if missing:
        raise CheckpointError(f"checkpoint {ckpt.directory} is missing tensor {missing[0]}"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                              + " that config.json implies; is config.json from the same checkpoint?")
    allowed_extra = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    for name in sorted(present):
        if name in expected:
            shape = ckpt.shape(name)
            if shape != tuple(expected[name]):
                raise CheckpointError(f"tensor {name} in {ckpt.file_of(name)} has shape {list(shape)}, "
                                      f"config.json implies {list(expected[name])}")
            if cfg.fp8 is None and _is_fp8(ckpt.dtype(name)):
                raise CheckpointError(f"tensor {name} in {ckpt.file_of(name)} is FP8 but config.json has no "
                                      "quantization_config; use the checkpoint's own config.json")
            if _is_fp8(ckpt.dtype(name)) and name + "_scale_inv" not in present:
                raise CheckpointError(f"FP8 tensor {name} in {ckpt.file_of(name)} has no {name}_scale_inv; "
                                      "the checkpoint is incomplete")
            continue
        if name.endswith("_scale_inv") and name[: -len("_scale_inv")] in expected:
            from .fp8 import expected_scale_shape
            w = name[: -len("_scale_inv")]
            want = expected_scale_shape(expected[w], (cfg.fp8.block_out, cfg.fp8.block_in)) if cfg.fp8 else None
            if want is None:
                raise CheckpointError(f"tensor {name} in {ckpt.file_of(name)} is an FP8 scale but config.json "
                                      "has no quantization_config")
            if ckpt.shape(name) != want:
                raise CheckpointError(f"FP8 scale {name} in {ckpt.file_of(name)} has shape {list(ckpt.shape(name))}, "
                                      f"expected {list(want)} for weight {list(expected[w])} in "
                                      f"{cfg.fp8.block_out}x{cfg.fp8.block_in} blocks")
            if ckpt.dtype(name) not in (np.dtype(np.float32), np.dtype("bfloat16")) and \
                    str(ckpt.dtype(name)) != "bfloat16":
                raise CheckpointError(f"FP8 scale {name} in {ckpt.file_of(name)} has dtype {ckpt.dtype(name)}; "
                                      "expected float32 or bfloat16")
            continue
        if name in allowed_extra:
            continue
        raise CheckpointError(f"unexpected tensor {name} in {ckpt.file_of(name)}: config.json implies no such "
                              "weight (a different model, or a config.json from another checkpoint?)")
    if cfg.fp8 is not None:
        for key, s in param_sources(cfg).items():
            if not s.quantizable:
                continue
            for layer in range(cfg.num_hidden_layers):
                for n in _names_if_present(s, layer, present):
                    if not _is_fp8(ckpt.dtype(n)) and n + "_scale_inv" in present:
                        raise CheckpointError(f"tensor {n} in {ckpt.file_of(n)} has a scale but is "
                                              f"{ckpt.dtype(n)}, not float8_e4m3fn")
                    if not _is_fp8(ckpt.dtype(n)) and not kind_kept_unquantized(cfg, _fp8_kind(n)):
                        raise CheckpointError(
                            f"tensor {n} in {ckpt.file_of(n)} is {ckpt.dtype(n)} with no weight_scale_inv, but "
                            "config.json's quantization_config quantizes it (it is not in modules_to_not_convert); "
                            "add the module to modules_to_not_convert or re-quantize with python -m qwen3_jax.quantize")


def _fp8_kind(name: str) -> str:
    """'model.layers.3.mlp.experts.7.up_proj.weight' -> 'mlp.experts.up_proj' (as fp8.kind_modules names kinds)."""
    module = re.sub(r"^model\.layers\.\d+\.", "", name[: -len(".weight")])
    return re.sub(r"^mlp\.experts\.\d+\.", "mlp.experts.", module)


def _names_if_present(src: HfTensor, layer, present):
    return [n for n in src.names(layer) if n in present]
