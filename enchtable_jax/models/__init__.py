"""Configs, tensor tables and forward passes of the supported causal-LM families; `Model` (model.py), chat
rendering (chat.py) and model identity (identity.py)."""

from enchtable_jax.models.config import ConfigError, ModelConfig, RopeScaling, SUPPORTED_MODEL_TYPES
from enchtable_jax.models.init import init_params, preset_config
from enchtable_jax.models.tensors import expected_shapes
from enchtable_jax.models.transformer import forward

__all__ = ["ConfigError", "ModelConfig", "RopeScaling", "SUPPORTED_MODEL_TYPES", "expected_shapes", "forward",
           "init_params", "preset_config"]
