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
import functools
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from enchtable_jax.errors import EnchtableError
from enchtable_jax.models.activations import ACTIVATIONS
from enchtable_jax.safe_io import check_inside, read_json

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")

# transformers' config class of each family. A field a config.json omits gets that class's default, read from the
# class (as transformers fills it in when it loads the file), not copied here.
_HF_CONFIG_CLASSES = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config"}
# The fields the resolution below reads that a config.json may omit, per family.
_DEFAULTED = {
    "llama": ("rms_norm_eps", "tie_word_embeddings", "hidden_act", "attention_bias", "mlp_bias"),
    "mistral": ("rms_norm_eps", "tie_word_embeddings", "hidden_act", "sliding_window"),
    "qwen2": ("rms_norm_eps", "tie_word_embeddings", "hidden_act", "sliding_window", "use_sliding_window",
              "max_window_layers"),
}
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
MAX_LAYERS = 4096  # far above any released model (Llama-3.1-405B: 126); a larger count is a corrupt config


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
        """Resolve a raw Hugging Face config dict; `source` names it in errors.

        Every field used is type-checked (a bool is not an integer; floats are finite and positive).
        """
        model_type = _model_type(raw, source)
        d = _with_defaults(raw, model_type)
        for name in _REQUIRED:
            _positive_int(d.get(name), name, source)
        if d["num_hidden_layers"] > MAX_LAYERS:  # per-layer tuples of that length would not fit in memory
            raise ConfigError(f"{source}: field 'num_hidden_layers' is {d['num_hidden_layers']:.3g}, more than "
                              f"{MAX_LAYERS} layers; not a real model's config")
        heads = d["num_attention_heads"]
        kv_heads, head_dim = _attention_shape(d, source)
        _check_flags_norm_and_activation(d, source)
        _check_transformers_fields(raw, d["vocab_size"], source)
        rope_theta, rope = _read_rope(d, source, lambda: hf_default(model_type, "default_theta"))
        bias = _biases(model_type, d)
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
        check_inside(path.parent, path)
        raw = read_json(path, expect=None)
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the file must hold a JSON object, got {type(raw).__name__}")
        return cls.from_hf(raw, source=str(path))


def _model_type(raw: Any, source: str) -> str:
    """The family of a raw config, which must be a JSON object of a supported `model_type`."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: a config must be a JSON object, got {type(raw).__name__}")
    model_type = raw.get("model_type")
    if not isinstance(model_type, str) or model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"{source}: field 'model_type' {model_type!r:.100} is not supported; supported: "
                          f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    return model_type


def _with_defaults(raw: Mapping[str, Any], model_type: str) -> dict[str, Any]:
    """The raw fields, nulls dropped (a null sliding_window stays: no window), and transformers' default for each
    field the resolution reads that the config omits."""
    given = {k: v for k, v in raw.items() if v is not None or k == "sliding_window"}  # null window: none
    return {**{k: hf_default(model_type, k) for k in _DEFAULTED[model_type] if k not in given}, **given}


def _attention_shape(d: Mapping[str, Any], source: str) -> tuple[int, int]:
    """(num_key_value_heads, head_dim): KV heads dividing the attention heads; head_dim given, or hidden_size split
    over the heads."""
    heads = d["num_attention_heads"]
    kv_heads = _positive_int(d.get("num_key_value_heads", heads), "num_key_value_heads", source)
    if heads % kv_heads:
        raise ConfigError(f"{source}: num_attention_heads ({heads}) is not a multiple of "
                          f"num_key_value_heads ({kv_heads})")
    head_dim = d.get("head_dim")
    if head_dim is None:
        head_dim = d["hidden_size"] // heads
        if head_dim <= 0:
            raise ConfigError(f"{source}: field 'hidden_size' ({d['hidden_size']}) is smaller than "
                              f"num_attention_heads ({heads}); give head_dim or fix the sizes")
    else:
        _positive_int(head_dim, "head_dim", source)
    return kv_heads, head_dim


def _check_flags_norm_and_activation(d: Mapping[str, Any], source: str) -> None:
    """The boolean fields are booleans, rms_norm_eps a finite positive number, hidden_act a supported name."""
    for name in ("tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window"):
        if name in d and not isinstance(d[name], bool):
            raise ConfigError(f"{source}: field {name!r} must be true or false, got {d[name]!r:.100}")
    _positive_float(d["rms_norm_eps"], "rms_norm_eps", source)
    if not isinstance(d["hidden_act"], str) or d["hidden_act"] not in ACTIVATIONS:
        raise ConfigError(f"{source}: field 'hidden_act' {d['hidden_act']!r:.100} is not supported; supported: "
                          f"{', '.join(ACTIVATIONS)}")


def _biases(model_type: str, d: Mapping[str, Any]) -> tuple[bool, bool, bool]:
    """Which projections have biases: (q/k/v, o, mlp); Llama's are configured, Mistral's and Qwen2's fixed."""
    return ((d["attention_bias"],) * 2 + (d["mlp_bias"],) if model_type == "llama"
            else {"mistral": (False, False, False), "qwen2": (True, False, False)}[model_type])


@functools.cache
def hf_default(model_type: str, name: str) -> Any:
    """The default transformers' config class of `model_type` gives field `name` (or its class constant, such as
    `default_theta`). Imported only when a config omits a field: the config classes import torch."""
    import transformers

    return getattr(getattr(transformers, _HF_CONFIG_CLASSES[model_type]), name)


def _positive_int(value: Any, name: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{source}: field {name!r} must be a positive integer, got {value!r:.100}")
    return value


_TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "sep_token_id")


def _check_transformers_fields(raw: Mapping[str, Any], vocab_size: int, source: str) -> None:
    """The fields transformers reads (tokenizer, generation) are of the type it expects, so it never crashes on them.

    max_position_embeddings: a positive integer whenever present; hidden_act: a supported name (not null);
    token ids: null, an id in [0, vocab_size) (or -1, which older Llama configs use for "none") or a non-empty
    list of such ids.
    """
    if "max_position_embeddings" in raw:
        _positive_int(raw["max_position_embeddings"], "max_position_embeddings", source)
    if "hidden_act" in raw and (not isinstance(raw["hidden_act"], str) or raw["hidden_act"] not in ACTIVATIONS):
        raise ConfigError(f"{source}: field 'hidden_act' {raw['hidden_act']!r:.100} is not supported; supported: "
                          f"{', '.join(ACTIVATIONS)}")
    for name in _TOKEN_ID_FIELDS:
        value = raw.get(name)
        if value is None:
            continue
        ids = value if isinstance(value, list) and value else [value]
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, int) or not -1 <= i < vocab_size:  # -1: none (old Llama configs)
                raise ConfigError(f"{source}: field {name!r} must be a token id in [0, {vocab_size}) (vocab_size), -1 "
                                  f"or a non-empty list of them, got {value!r:.100}")


def _positive_float(value: Any, name: str, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{source}: field {name!r} must be a finite positive number, got {value!r:.100}")
    return float(value)


def _read_rope(d: Mapping[str, Any], source: str, default_theta: Callable[[], float]) -> tuple[float, RopeScaling]:
    """RoPE settings from transformers-5 `rope_parameters` or transformers-4 `rope_theta`/`rope_scaling`;
    `default_theta()` when neither gives θ."""
    field = "rope_parameters" if d.get("rope_parameters") else "rope_scaling"
    params = d.get(field) or {}
    if not isinstance(params, Mapping):
        raise ConfigError(f"{source}: field {field!r} must be an object, got {params!r:.100}")
    if "rope_theta" in params:
        theta = _positive_float(params["rope_theta"], f"{field}.rope_theta", source)
    else:
        theta = _positive_float(d["rope_theta"] if "rope_theta" in d else default_theta(), "rope_theta", source)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if not isinstance(rope_type, str) or rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"{source}: rope type {rope_type!r} is not supported; supported: "
                          f"{', '.join(SUPPORTED_ROPE_TYPES)}")
    if rope_type == "default":
        return theta, RopeScaling()
    missing = [k for k in ("factor",) + (("low_freq_factor", "high_freq_factor") if rope_type == "llama3" else ())
               if k not in params]
    if missing:
        raise ConfigError(f"{source}: rope type {rope_type!r} needs field(s) {missing} in rope_parameters")
    original = params.get("original_max_position_embeddings")
    original = _positive_int(original, f"{field}.original_max_position_embeddings", source) if original is not None \
        else _positive_int(d.get("max_position_embeddings", 8192), "max_position_embeddings", source)
    return theta, RopeScaling(
        rope_type=rope_type,
        factor=_positive_float(params["factor"], f"{field}.factor", source),
        low_freq_factor=_positive_float(params.get("low_freq_factor", 1.0), f"{field}.low_freq_factor", source),
        high_freq_factor=_positive_float(params.get("high_freq_factor", 4.0), f"{field}.high_freq_factor", source),
        original_max_position_embeddings=original,
    )


def _sliding_windows(model_type: str, d: Mapping[str, Any], source: str) -> tuple[int | None, ...]:
    """Per-layer attention window, following each family's transformers rule."""
    n = d["num_hidden_layers"]
    if model_type == "llama":
        return (None,) * n
    if d["sliding_window"] is not None:  # llama returned above: the other families always have the key
        _positive_int(d["sliding_window"], "sliding_window", source)
    if model_type == "mistral":  # one window for every layer; a missing key means 4096, null means none
        return (d["sliding_window"],) * n
    window = d["sliding_window"] if d.get("use_sliding_window") else None
    layer_types = d.get("layer_types")
    if isinstance(d["max_window_layers"], bool) or not isinstance(d["max_window_layers"], int):
        raise ConfigError(f"{source}: field 'max_window_layers' must be an integer, got "
                          f"{d['max_window_layers']!r:.100}")
    if layer_types is None:
        layer_types = ["sliding_attention" if window is not None and i >= d["max_window_layers"] else "full_attention"
                       for i in range(n)]
    if (not isinstance(layer_types, list) or len(layer_types) != n
            or not all(t in ("sliding_attention", "full_attention") for t in layer_types)):
        raise ConfigError(f"{source}: layer_types must list 'full_attention'/'sliding_attention' for each of "
                          f"the {n} layers, got {layer_types!r}")
    return tuple(window if t == "sliding_attention" else None for t in layer_types)
