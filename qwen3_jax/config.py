"""Qwen3-MoE configuration: a frozen dataclass built from a checkpoint's config.json.

Only fields that change the computation live here. Both spellings that published
checkpoints and transformers 5.x use are accepted: `num_experts` / `num_local_experts`,
`rope_theta` + `rope_scaling` / `rope_parameters`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

PRESET_DIR = os.path.join(os.path.dirname(__file__), "presets")
SUPPORTED_ROPE_TYPES = ("default", "yarn")


class ConfigError(ValueError):
    """A config.json the model cannot honour (unsupported feature, inconsistent sizes)."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding settings; `yarn` fields are ignored for `default`."""

    theta: float = 1_000_000.0
    type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True


@dataclasses.dataclass(frozen=True)
class Fp8Config:
    """Qwen's block-FP8 format: e4m3 weights, one inverse scale per `block` tile."""

    block_out: int = 128
    block_in: int = 128
    modules_to_not_convert: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Qwen3MoeConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_experts: int
    num_experts_per_tok: int
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    max_position_embeddings: int = 40960
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    fp8: Fp8Config | None = None
    # A label only: excluded from ==/hash so two checkpoints of one shape share compiled steps.
    name: str = dataclasses.field(default="qwen3_moe", compare=False)

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}; grouped-query attention needs it")
        if not 0 < self.num_experts_per_tok <= max(self.num_experts, 1):
            raise ConfigError(
                f"num_experts_per_tok={self.num_experts_per_tok} must be in 1..num_experts={self.num_experts}")
        if self.decoder_sparse_step < 1:
            raise ConfigError(f"decoder_sparse_step={self.decoder_sparse_step} must be >= 1")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings")

    # -- derived -------------------------------------------------------------------------
    def is_moe_layer(self, layer: int) -> bool:
        """Qwen3-MoE's rule: sparse unless listed in mlp_only_layers or off the sparse step."""
        return (layer not in self.mlp_only_layers and self.num_experts > 0
                and (layer + 1) % self.decoder_sparse_step == 0)

    def layer_segments(self) -> list[tuple[str, int, int]]:
        """Runs of consecutive same-kind layers: [(kind, first_layer, count)], kind 'moe'|'dense'.

        Each run is one scanned stack, so a uniform MoE model compiles one layer body.
        """
        segments: list[tuple[str, int, int]] = []
        for i in range(self.num_hidden_layers):
            kind = "moe" if self.is_moe_layer(i) else "dense"
            if segments and segments[-1][0] == kind:
                k, start, n = segments[-1]
                segments[-1] = (k, start, n + 1)
            else:
                segments.append((kind, i, 1))
        return segments

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    # -- construction --------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any], name: str = "qwen3_moe") -> "Qwen3MoeConfig":
        model_type = d.get("model_type", "qwen3_moe")
        if model_type != "qwen3_moe":
            raise ConfigError(f"model_type={model_type!r} is not supported; this server runs 'qwen3_moe' "
                              "checkpoints (Qwen3-30B-A3B, Qwen3-235B-A22B and their -FP8 variants)")
        if d.get("use_sliding_window"):
            raise ConfigError("use_sliding_window=true is not supported (Qwen3-MoE checkpoints ship it "
                              "false); set it to false in config.json to serve with full attention")
        num_heads = d["num_attention_heads"]
        head_dim = d.get("head_dim") or d["hidden_size"] // num_heads
        num_experts = d.get("num_experts", d.get("num_local_experts"))
        if num_experts is None:
            raise ConfigError("config.json has neither num_experts nor num_local_experts")
        eos = d.get("eos_token_id")
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            moe_intermediate_size=d["moe_intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=num_heads,
            num_key_value_heads=d.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            num_experts=num_experts,
            num_experts_per_tok=d["num_experts_per_tok"],
            norm_topk_prob=bool(d.get("norm_topk_prob", False)),
            decoder_sparse_step=d.get("decoder_sparse_step", 1),
            mlp_only_layers=tuple(d.get("mlp_only_layers") or ()),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope=_parse_rope(d),
            max_position_embeddings=d.get("max_position_embeddings", 40960),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", False)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            fp8=_parse_quantization(d.get("quantization_config")),
            name=name,
        )

    @classmethod
    def from_json(cls, path: str) -> "Qwen3MoeConfig":
        """`path` is a config.json or a directory holding one."""
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} not found: a checkpoint directory needs a config.json")
        with open(path) as f:
            d = json.load(f)
        return cls.from_dict(d, name=os.path.basename(os.path.dirname(os.path.abspath(path))))

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json transformers' Qwen3MoeConfig reads (older, published spelling)."""
        rope_scaling = None
        if self.rope.type == "yarn":
            rope_scaling = {"rope_type": "yarn", "factor": self.rope.factor,
                            "beta_fast": self.rope.beta_fast, "beta_slow": self.rope.beta_slow}
            if self.rope.original_max_position_embeddings:
                rope_scaling["original_max_position_embeddings"] = self.rope.original_max_position_embeddings
            for k in ("attention_factor", "mscale", "mscale_all_dim"):
                if getattr(self.rope, k) is not None:
                    rope_scaling[k] = getattr(self.rope, k)
            if not self.rope.truncate:  # moves the ramp's bounds, so it must survive the round trip
                rope_scaling["truncate"] = False
        d = {
            "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "moe_intermediate_size": self.moe_intermediate_size,
            "num_hidden_layers": self.num_hidden_layers, "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads, "head_dim": self.head_dim,
            "num_experts": self.num_experts, "num_experts_per_tok": self.num_experts_per_tok,
            "norm_topk_prob": self.norm_topk_prob, "decoder_sparse_step": self.decoder_sparse_step,
            "mlp_only_layers": list(self.mlp_only_layers), "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope.theta, "rope_scaling": rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings, "attention_bias": self.attention_bias,
            "use_sliding_window": False, "hidden_act": "silu",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            "torch_dtype": "bfloat16",
        }
        if self.fp8 is not None:
            d["quantization_config"] = {
                "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                "weight_block_size": [self.fp8.block_out, self.fp8.block_in]}
            if self.fp8.modules_to_not_convert:
                d["quantization_config"]["modules_to_not_convert"] = list(self.fp8.modules_to_not_convert)
        return d


def _parse_rope(d: dict[str, Any]) -> RopeConfig:
    # transformers 5.x: rope_parameters = {"rope_type", "rope_theta", ...scaling fields}.
    # Published checkpoints: rope_theta plus an optional rope_scaling dict.
    params = dict(d.get("rope_parameters") or {})
    scaling = dict(d.get("rope_scaling") or {})
    merged = {**scaling, **params}
    theta = merged.get("rope_theta", d.get("rope_theta", 10000.0))
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"rope type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)} "
                          "(remove rope_scaling for the default, or use yarn for long context)")
    if rope_type == "default":
        return RopeConfig(theta=float(theta))
    if "factor" not in merged:
        raise ConfigError("yarn rope scaling needs a 'factor' in rope_scaling/rope_parameters")
    # Absent, the original context is max_position_embeddings (transformers writes it out so).
    original = merged.get("original_max_position_embeddings") or d.get("max_position_embeddings", 40960)
    return RopeConfig(
        theta=float(theta), type="yarn", factor=float(merged["factor"]),
        original_max_position_embeddings=int(original),
        beta_fast=float(merged.get("beta_fast") or 32.0), beta_slow=float(merged.get("beta_slow") or 1.0),
        attention_factor=merged.get("attention_factor"), mscale=merged.get("mscale"),
        mscale_all_dim=merged.get("mscale_all_dim"), truncate=bool(merged.get("truncate", True)))


def _parse_quantization(q: dict[str, Any] | None) -> Fp8Config | None:
    if not q:
        return None
    method = q.get("quant_method")
    if method != "fp8":
        raise ConfigError(f"quantization_config.quant_method={method!r} is not supported; "
                          "only Qwen's block-FP8 ('fp8') checkpoints are")
    fmt = q.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ConfigError(f"quantization_config.fmt={fmt!r} is not supported; only e4m3 is")
    if q.get("activation_scheme", "dynamic") != "dynamic":
        raise ConfigError(f"activation_scheme={q.get('activation_scheme')!r} is not supported; only 'dynamic' is "
                          "(no static activation scales are read: the GPU kernels quantize activations per "
                          "token group as they run, the plain-XLA path keeps them in the compute dtype)")
    block = q.get("weight_block_size")
    if not block or len(block) != 2:
        raise ConfigError("quantization_config.weight_block_size must be [out, in], e.g. [128, 128]; "
                          "per-tensor FP8 is not supported")
    return Fp8Config(block_out=int(block[0]), block_in=int(block[1]),
                     modules_to_not_convert=tuple(q.get("modules_to_not_convert") or ()))


def yarn_inv_freq(rope: RopeConfig, head_dim: int, max_position_embeddings: int):
    """(inverse frequencies [Q/2] as float64 numpy, attention scaling) for a RopeConfig."""
    import numpy as np

    base, dim = rope.theta, head_dim
    pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float32).astype(np.float32) / dim)
    inv_extra = (1.0 / pos_freqs).astype(np.float32)
    if rope.type == "default":
        return inv_extra, 1.0
    factor = rope.factor
    original = rope.original_max_position_embeddings or max_position_embeddings

    def get_mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = get_mscale(factor, rope.mscale) / get_mscale(factor, rope.mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)

    def correction_dim(rot):
        return (dim * math.log(original / (rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    extra_factor = (1 - ramp).astype(np.float32)
    inv_inter = (1.0 / (factor * pos_freqs)).astype(np.float32)
    inv = (inv_inter * (1 - extra_factor) + inv_extra * extra_factor).astype(np.float32)
    return inv, float(attention_factor)


# -- presets: public config.json values, data only ------------------------------------------

def preset_names() -> list[str]:
    return sorted(f[:-5] for f in os.listdir(PRESET_DIR) if f.endswith(".json"))


def load_preset(name: str) -> Qwen3MoeConfig:
    path = os.path.join(PRESET_DIR, f"{name}.json")
    if not os.path.exists(path):
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(preset_names())}")
    with open(path) as f:
        return Qwen3MoeConfig.from_dict(json.load(f), name=name)


def resolve_config(model: str) -> Qwen3MoeConfig:
    """A preset name (e.g. 'Qwen3-30B-A3B-FP8') or a checkpoint directory / config.json path."""
    if os.path.exists(model):
        return Qwen3MoeConfig.from_json(model)
    base = os.path.basename(model.rstrip("/"))
    if base in preset_names():
        return load_preset(base)
    raise ConfigError(f"{model!r} is neither a checkpoint directory nor a preset; "
                      f"presets: {', '.join(preset_names())}")
