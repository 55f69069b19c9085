"""qwen3_jax: a Flax/JAX Qwen3-MoE with sharded loading of Hugging Face checkpoints (bf16 and block-FP8)."""

from .api import Model, load, random_model
from .config import ConfigError, Qwen3MoeConfig, load_preset, preset_names, resolve_config
from .safetensors_io import CheckpointError

__all__ = ["Model", "load", "random_model", "Qwen3MoeConfig", "ConfigError", "CheckpointError",
           "load_preset", "preset_names", "resolve_config"]
