"""The tensors a causal LM of a given config must have: Hugging Face names and (out, in) shapes.

Parameters are kept under their Hugging Face names and layout, so conversion is a rename-free copy and
SVDs, norms and written files agree with PyTorch bit for bit. This table is the single place that
knows the names; the forward pass, the converters and the merge all read it.
"""

from __future__ import annotations

import re

from enchtable_jax.errors import EnchtableError
from enchtable_jax.models.config import ModelConfig

# Dimension symbols resolved from the config: vocab, hidden, ffn (intermediate), q = heads * head_dim,
# kv = kv_heads * head_dim. They are also each axis's logical name for sharding (`logical_axes`).
_GLOBAL = (
    ("model.embed_tokens.weight", ("vocab", "hidden"), None),
    ("model.norm.weight", ("hidden",), None),
    ("lm_head.weight", ("vocab", "hidden"), "untied_head"),
)
_LAYER = (
    ("self_attn.q_proj.weight", ("q", "hidden"), None),
    ("self_attn.q_proj.bias", ("q",), "qkv_bias"),
    ("self_attn.k_proj.weight", ("kv", "hidden"), None),
    ("self_attn.k_proj.bias", ("kv",), "qkv_bias"),
    ("self_attn.v_proj.weight", ("kv", "hidden"), None),
    ("self_attn.v_proj.bias", ("kv",), "qkv_bias"),
    ("self_attn.o_proj.weight", ("hidden", "q"), None),
    ("self_attn.o_proj.bias", ("hidden",), "o_bias"),
    ("mlp.gate_proj.weight", ("ffn", "hidden"), None),
    ("mlp.gate_proj.bias", ("ffn",), "mlp_bias"),
    ("mlp.up_proj.weight", ("ffn", "hidden"), None),
    ("mlp.up_proj.bias", ("ffn",), "mlp_bias"),
    ("mlp.down_proj.weight", ("hidden", "ffn"), None),
    ("mlp.down_proj.bias", ("hidden",), "mlp_bias"),
    ("input_layernorm.weight", ("hidden",), None),
    ("post_attention_layernorm.weight", ("hidden",), None),
)

_LAYER_NAMES = frozenset(name for name, _, _ in _LAYER)
_GLOBAL_NAMES = frozenset(name for name, _, _ in _GLOBAL)

# Written by some tied checkpoints although the config ties it; accepted, never required.
OPTIONAL_TIED_HEAD = "lm_head.weight"


def layer_prefix(i: int) -> str:
    return f"model.layers.{i}."


def logical_axes(config: ModelConfig) -> dict[str, tuple[str, ...]]:
    """Every tensor the config requires, with the logical name of each axis (vocab, hidden, ffn, q, kv), in the
    order transformers' state_dict lists them. Sharding rules map these names onto mesh axes."""
    flags = {
        None: True,
        "untied_head": not config.tie_word_embeddings,
        "qkv_bias": config.qkv_bias,
        "o_bias": config.o_bias,
        "mlp_bias": config.mlp_bias,
    }

    def entries(prefix, table):
        return {prefix + name: names for name, names, flag in table if flags[flag]}

    axes = entries("", _GLOBAL[:1])
    for i in range(config.num_hidden_layers):
        axes.update(entries(layer_prefix(i), _LAYER))
    axes.update(entries("", _GLOBAL[1:]))
    return axes


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the config requires, with its shape, in the order transformers' state_dict lists them."""
    dims = {
        "vocab": config.vocab_size,
        "hidden": config.hidden_size,
        "ffn": config.intermediate_size,
        "q": config.num_attention_heads * config.head_dim,
        "kv": config.num_key_value_heads * config.head_dim,
    }
    return {name: tuple(dims[d] for d in axes) for name, axes in logical_axes(config).items()}


def check_shapes(config: ModelConfig, shapes: dict[str, tuple[int, ...]], source: str) -> list[str]:
    """Raise on a missing or misshapen tensor; return the names the config does not know (extras)."""
    expected = expected_shapes(config)
    missing = [n for n in expected if n not in shapes]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise EnchtableError(f"{source}: tensor(s) {', '.join(missing[:5])}{more} missing for this config.json "
                             f"({config.model_type}, {config.num_hidden_layers} layers); is the checkpoint complete "
                             "and does config.json belong to it?")
    for name, shape in expected.items():
        if tuple(shapes[name]) != shape:
            raise EnchtableError(f"{source}: tensor {name} has shape {tuple(shapes[name])}, but config.json implies "
                                 f"{shape}; config.json and the weights do not belong together")
    if config.tie_word_embeddings and OPTIONAL_TIED_HEAD in shapes:
        if tuple(shapes[OPTIONAL_TIED_HEAD]) != expected["model.embed_tokens.weight"]:
            raise EnchtableError(f"{source}: tensor lm_head.weight has shape {tuple(shapes[OPTIONAL_TIED_HEAD])}, "
                                 f"expected {expected['model.embed_tokens.weight']}")
        expected = {**expected, OPTIONAL_TIED_HEAD: ()}
    extras = [n for n in shapes if n not in expected]
    for name in extras:
        _refuse_layout_extra(config, name, source)
    return extras


def _refuse_layout_extra(config: ModelConfig, name: str, source: str) -> None:
    """An unexpected tensor the layout knows (a layer past num_hidden_layers, a bias the config turns off) means
    config.json and the weights disagree: running would silently drop weights, so it is refused."""
    layer = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if layer and int(layer.group(1)) >= config.num_hidden_layers:
        raise EnchtableError(f"{source}: unexpected tensor {name}: config.json has num_hidden_layers "
                             f"{config.num_hidden_layers}, but the weights hold layer {int(layer.group(1))}; "
                             "config.json and the weights do not belong together")
    if layer and layer.group(2) in _LAYER_NAMES or name in _GLOBAL_NAMES:
        raise EnchtableError(f"{source}: unexpected tensor {name}: config.json ({config.model_type}) does not use it "
                             "(e.g. a bias the config turns off); config.json and the weights do not belong together")
