"""Fields a config.json omits resolve to what transformers fills in for them: the oracle is transformers' own config
object built from the same minimal dict (models/config.py reads the defaults from transformers' config classes)."""

from __future__ import annotations

import dataclasses

import pytest
import transformers

from enchtable_jax.models import ModelConfig
from enchtable_jax.models.config import _DEFAULTED, hf_default

MINIMAL = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4)
CLASSES = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig, "qwen2": transformers.Qwen2Config}


@pytest.mark.parametrize("model_type", sorted(CLASSES))
def test_omitted_fields_resolve_as_transformers_resolves_them(model_type):
    ours = ModelConfig.from_hf({"model_type": model_type, **MINIMAL})
    theirs = CLASSES[model_type](**MINIMAL)
    assert ours.rms_norm_eps == theirs.rms_norm_eps
    assert ours.tie_word_embeddings == theirs.tie_word_embeddings
    assert ours.hidden_act == theirs.hidden_act
    assert ours.rope_theta == theirs.rope_parameters["rope_theta"]
    if model_type == "llama":
        assert (ours.qkv_bias, ours.mlp_bias) == (theirs.attention_bias, theirs.mlp_bias)
    windows = getattr(theirs, "layer_types", None) or ["sliding_attention"] * MINIMAL["num_hidden_layers"]
    assert ours.sliding_windows == tuple(getattr(theirs, "sliding_window", None) if t == "sliding_attention" else None
                                         for t in windows)


def test_qwen2_window_default_when_only_switched_on():
    """use_sliding_window without sliding_window: transformers' default window on the layers from max_window_layers
    on (both defaults read from Qwen2Config)."""
    raw = {"model_type": "qwen2", **MINIMAL, "use_sliding_window": True, "max_window_layers": 1}
    theirs = transformers.Qwen2Config(**{k: v for k, v in raw.items() if k != "model_type"})
    assert ModelConfig.from_hf(raw).sliding_windows == (None, theirs.sliding_window, theirs.sliding_window)
    assert theirs.sliding_window == hf_default("qwen2", "sliding_window")


@pytest.mark.parametrize("model_type", sorted(CLASSES))
def test_every_defaulted_field_is_a_field_of_the_transformers_class(model_type):
    """Not a name transformers does not have (getattr would find nothing, or an unrelated class attribute)."""
    names = {f.name for f in dataclasses.fields(CLASSES[model_type])}
    assert set(_DEFAULTED[model_type]) <= names


def test_smollm2_preset_lists_what_a_real_config_lists(monkeypatch):
    """The SmolLM2-shaped preset (the merge study's models) gives every field a real SmolLM2 config.json gives, so
    reading the folders it makes needs no transformers default: importing transformers' config classes imports
    torch (2 s and 236 MB of the merge study's cold process, which a real SmolLM2 folder does not cost)."""
    from enchtable_jax.models import config as config_module
    from enchtable_jax.models.init import preset_config

    def refuse(*_):
        raise AssertionError("a transformers default was needed")

    monkeypatch.setattr(config_module, "hf_default", refuse)
    config = preset_config("smollm2-135m")
    assert ModelConfig.from_hf(config.hf) == config
    assert config.hf["attention_bias"] is False and config.hf["mlp_bias"] is False
    assert transformers.LlamaConfig().attention_bias is False and transformers.LlamaConfig().mlp_bias is False
