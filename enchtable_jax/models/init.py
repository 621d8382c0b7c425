"""Built-in model shapes and random initialisation, for demos, tests and speed studies.

Presets are HF config dicts, so a model built here is written as an ordinary HF folder that
transformers loads.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from enchtable_jax.errors import EnchtableError
from enchtable_jax.options import INIT_OPTIONS
from enchtable_jax.models.config import ModelConfig
from enchtable_jax.models.tensors import expected_shapes

EOS_ID = 256  # `<|endoftext|>` of the byte-level tokenizer that `enchtable init` writes beside the weights

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}

PRESETS: dict[str, dict[str, Any]] = {
    # A few hundred thousand parameters: compiles and runs in seconds on one CPU core. The vocabulary
    # holds the byte-level tokenizer of `models.tokenizer` (259 tokens), rounded up to a multiple of 8.
    "tiny": dict(vocab_size=264, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False),
    # SmolLM2-135M's shape (Llama architecture, tied embeddings).
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True),
    # One decoder layer of Llama-3-8B's shape, with its vocabulary: the unit of 8B-scale speed studies.
    "llama3-8b-layer": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=1,
                            num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                            rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False),
}


def preset_config(name: str = "tiny", model_type: str = "llama", **overrides: Any) -> ModelConfig:
    """A ModelConfig from a named preset shape, for any supported family; `overrides` are HF config fields."""
    if name not in PRESETS:
        raise EnchtableError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    if model_type not in _ARCHITECTURES:
        raise EnchtableError(f"unknown model_type {model_type!r}; choose one of {', '.join(_ARCHITECTURES)}")
    raw = {"architectures": [_ARCHITECTURES[model_type]], "model_type": model_type, "hidden_act": "silu",
           "dtype": "float32", **PRESETS[name], **overrides}
    if raw["vocab_size"] > EOS_ID:  # room for the byte-level tokenizer's special tokens
        raw = {"eos_token_id": EOS_ID, "pad_token_id": EOS_ID, **raw}
    if model_type in ("mistral", "qwen2"):
        raw.setdefault("sliding_window", None)
    if model_type == "llama":  # listed, as in a real Llama config.json: reading them needs no transformers default
        raw = {"attention_bias": False, "mlp_bias": False, **raw}
    return ModelConfig.from_hf(raw, source=f"preset {name!r}")


def init_params(config: ModelConfig, seed: int = 0, dtype: Any = jnp.float32, std: float = 0.02) -> dict[str, jax.Array]:
    """Random parameters in HF layout: N(0, std) matrices and embeddings, unit norms, zero biases."""
    INIT_OPTIONS["seed"].check("seed", seed)
    shapes = expected_shapes(config)
    keys = jax.random.split(jax.random.key(seed), len(shapes))
    params = {}
    for key, (name, shape) in zip(keys, shapes.items()):
        if name.endswith("norm.weight"):
            params[name] = jnp.ones(shape, dtype)
        elif name.endswith(".bias"):
            params[name] = jnp.zeros(shape, dtype)
        else:
            params[name] = (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
    return params


def count_parameters(shapes: dict[str, tuple[int, ...]]) -> int:
    """Total number of scalars in a {name: shape} table."""
    return sum(int(np.prod(s)) for s in shapes.values())
