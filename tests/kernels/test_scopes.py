"""Scope resolution: the right tensors per scope and layer range, and clear errors."""

import pytest

from enchtable_jax.kernels.scopes import ScopeError, parse_layers, resolve_scope
from enchtable_jax.models import preset_config

CONFIG = preset_config("tiny", "qwen2", num_hidden_layers=6)  # q/k/v biases: scopes must own them too


def _layers(names):
    return sorted({int(n.split(".")[2]) for n in names if n.startswith("model.layers.")})


@pytest.mark.parametrize("scope,suffixes", [
    ("ffn", {"mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"}),
    ("attn", {f"self_attn.{p}_proj.{w}" for p in "qkv" for w in ("weight", "bias")} | {"self_attn.o_proj.weight"}),
    ("attn_block", {f"self_attn.{p}_proj.{w}" for p in "qkv" for w in ("weight", "bias")} | {"self_attn.o_proj.weight"}),
])
def test_scope_owns_exactly_its_tensors(scope, suffixes):
    s = resolve_scope(CONFIG, scope)
    assert {n.split(".", 3)[3] for n in s.params} == suffixes
    assert _layers(s.params) == list(range(6))


def test_units_per_scope():
    assert resolve_scope(CONFIG, "ffn").units[0] == "model.layers.0.mlp"
    assert len(resolve_scope(CONFIG, "attn").units) == 4 * 6
    assert len(resolve_scope(CONFIG, "attn_ffn").units) == 5 * 6
    assert resolve_scope(CONFIG, "attn_block+ffn").units[:2] == ("model.layers.0.self_attn", "model.layers.0.mlp")


def test_model_scope_is_the_backbone():
    s = resolve_scope(CONFIG, "model")
    assert s.whole_model and s.units == ()
    assert "model.norm.weight" in s.params and "model.layers.5.input_layernorm.weight" in s.params
    assert "model.embed_tokens.weight" not in s.params and "lm_head.weight" not in s.params


def test_all_scope_is_every_tensor_and_layers_limit_only_the_decoder_layers():
    from enchtable_jax.models.tensors import expected_shapes

    s = resolve_scope(CONFIG, "all")
    assert s.whole_model and s.units == () and s.params == tuple(expected_shapes(CONFIG))
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= set(s.params)
    ranged = resolve_scope(CONFIG, "all", "2:4")
    assert _layers(ranged.params) == [2, 3]
    assert {n for n in ranged.params if not n.startswith("model.layers.")} == {
        "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    assert set(ranged.params) >= set(resolve_scope(CONFIG, "model", "2:4").params)
    tied = preset_config("tiny", "llama", tie_word_embeddings=True)  # the head is the embedding: not a tensor
    assert "lm_head.weight" not in resolve_scope(tied, "all").params


@pytest.mark.parametrize("layers,expected", [("2:-2", [2, 3]), ("4:", [4, 5]), (":1", [0]), ("-1", [5]), (None, list(range(6)))])
def test_layer_ranges(layers, expected):
    assert _layers(resolve_scope(CONFIG, "ffn", layers).params) == expected
    assert list(parse_layers(layers, 6)) == expected


@pytest.mark.parametrize("scope,layers,fragment", [
    ("mlp", None, "unknown scope 'mlp'"),
    ("ffn", "3:3", "selects no parameters"),
    ("ffn", "a:b", "not understood"),
    ("ffn", "9", "not understood"),
    ("attn+attn_block", None, "nests units"),
    ("model+ffn", None, "do not combine"),
    ("ffn+all", None, "'all' already covers every tensor; do not combine"),
])
def test_bad_scopes_are_explained(scope, layers, fragment):
    with pytest.raises(ScopeError, match=fragment) as e:
        resolve_scope(CONFIG, scope, layers)
    if "unknown" in fragment or "no parameters" in fragment:
        assert "ffn" in str(e.value) and "attn_block" in str(e.value)  # lists the valid choices
