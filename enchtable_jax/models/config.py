"""Model configuration read from a Hugging Face `config.json`.

One frozen (hashable) dataclass serves every supported family, so jitted functions can take it as a
static argument. The per-family differences (which biases exist, how sliding windows are assigned,
defaults Hugging Face fills in) are resolved here, once, from the raw dict; the forward pass and the
tensor table only read the resolved fields. The raw dict is kept so that writing a folder back
reproduces the original `config.json`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from enchtable_jax.errors import EnchtableError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh", "relu")

# Hugging Face defaults for fields a config.json may omit, per family (transformers 5 config classes).
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"rms_norm_eps": 1e-6, "tie_word_embeddings": False, "hidden_act": "silu"},
    "mistral": {"rms_norm_eps": 1e-6, "tie_word_embeddings": False, "hidden_act": "silu", "sliding_window": 4096},
    "qwen2": {"rms_norm_eps": 1e-6, "tie_word_embeddings": False, "hidden_act": "silu", "sliding_window": 4096,
              "use_sliding_window": False, "max_window_layers": 28},
}
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


class ConfigError(EnchtableError):
    """A config.json that this package cannot use; the message names the field and the fix."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling as Hugging Face's `rope_parameters` describe it."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Resolved architecture of a Llama / Mistral / Qwen2 causal LM."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    hidden_act: str
    rms_norm_eps: float
    rope_theta: float
    rope: RopeScaling
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    sliding_windows: tuple[int | None, ...]  # one entry per layer; None = full causal attention
    hf: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)

    @classmethod
    def from_hf(cls, raw: Mapping[str, Any], source: str = "config.json") -> ModelConfig:
        """Resolve a raw Hugging Face config dict; `source` names it in errors."""
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{source}: model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        d = {**_DEFAULTS[model_type], **{k: v for k, v in raw.items() if v is not None or k == "sliding_window"}}
        for name in _REQUIRED:
            if not isinstance(d.get(name), int) or d[name] <= 0:
                raise ConfigError(f"{source}: field {name!r} must be a positive integer, got {d.get(name)!r}")
        heads = d["num_attention_heads"]
        kv_heads = d.get("num_key_value_heads", heads)
        if not isinstance(kv_heads, int) or kv_heads <= 0:
            raise ConfigError(f"{source}: field 'num_key_value_heads' must be a positive integer, got {kv_heads!r}")
        if heads % kv_heads:
            raise ConfigError(f"{source}: num_attention_heads ({heads}) is not a multiple of "
                              f"num_key_value_heads ({kv_heads})")
        head_dim = d.get("head_dim") or d["hidden_size"] // heads
        if d["hidden_act"] not in ACTIVATIONS:
            raise ConfigError(f"{source}: hidden_act {d['hidden_act']!r} is not supported; supported: "
                              f"{', '.join(ACTIVATIONS)}")
        rope_theta, rope = _read_rope(d, source)
        bias = {
            "llama": (bool(d.get("attention_bias", False)),) * 2 + (bool(d.get("mlp_bias", False)),),
            "mistral": (False, False, False),
            "qwen2": (True, False, False),
        }[model_type]
        return cls(
            model_type=model_type,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            hidden_act=d["hidden_act"],
            rms_norm_eps=float(d["rms_norm_eps"]),
            rope_theta=rope_theta,
            rope=rope,
            tie_word_embeddings=bool(d["tie_word_embeddings"]),
            qkv_bias=bias[0],
            o_bias=bias[1],
            mlp_bias=bias[2],
            sliding_windows=_sliding_windows(model_type, d, source),
            hf=copy.deepcopy(dict(raw)),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        """Read `config.json` (or a folder holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: config.json not found; an HF model folder needs one "
                                    "(copy it from the model this checkpoint came from)")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from e
        return cls.from_hf(raw, source=str(path))


def _read_rope(d: Mapping[str, Any], source: str) -> tuple[float, RopeScaling]:
    """RoPE settings from transformers-5 `rope_parameters` or transformers-4 `rope_theta`/`rope_scaling`."""
    params = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", d.get("rope_theta", 10_000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"{source}: rope type {rope_type!r} is not supported; supported: "
                          f"{', '.join(SUPPORTED_ROPE_TYPES)}")
    if rope_type == "default":
        return theta, RopeScaling()
    missing = [k for k in ("factor",) + (("low_freq_factor", "high_freq_factor") if rope_type == "llama3" else ())
               if k not in params]
    if missing:
        raise ConfigError(f"{source}: rope type {rope_type!r} needs field(s) {missing} in rope_parameters")
    return theta, RopeScaling(
        rope_type=rope_type,
        factor=float(params["factor"]),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params.get("original_max_position_embeddings",
                                                        d.get("max_position_embeddings", 8192))),
    )


def _sliding_windows(model_type: str, d: Mapping[str, Any], source: str) -> tuple[int | None, ...]:
    """Per-layer attention window, following each family's transformers rule."""
    n = d["num_hidden_layers"]
    if model_type == "llama":
        return (None,) * n
    if model_type == "mistral":  # one window for every layer; a missing key means 4096, null means none
        return (d["sliding_window"],) * n
    window = d["sliding_window"] if d.get("use_sliding_window") else None
    layer_types = d.get("layer_types")
    if layer_types is None:
        layer_types = ["sliding_attention" if window is not None and i >= d["max_window_layers"] else "full_attention"
                       for i in range(n)]
    if len(layer_types) != n or set(layer_types) - {"sliding_attention", "full_attention"}:
        raise ConfigError(f"{source}: layer_types must list 'full_attention'/'sliding_attention' for each of "
                          f"the {n} layers, got {layer_types!r}")
    return tuple(window if t == "sliding_attention" else None for t in layer_types)
