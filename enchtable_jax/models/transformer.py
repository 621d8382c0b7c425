"""Causal-LM forward pass of the Llama / Mistral / Qwen2 families, as a pure function of the params.

`params` is a flat dict keyed by Hugging Face tensor names with weights in (out, in) layout; the
function reads only the names of `tensors.expected_shapes`, so extra entries are ignored. The
numerics follow transformers' PyTorch implementation: RMSNorm and softmax in float32, RoPE tables in
float32 cast to the compute dtype, rotate-half RoPE, grouped-query attention.

Shapes: B batch, T tokens, H query heads, K key/value heads, D head_dim.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from enchtable_jax.models.config import ModelConfig, RopeScaling
from enchtable_jax.models.tensors import layer_prefix

Params = Mapping[str, jax.Array]
# unit(name, fn, params) evaluates the sub-network `name` (e.g. "model.layers.3.mlp",
# "model.layers.3.self_attn", "model.layers.3.self_attn.q_proj") as fn(params). It is the one seam
# through which the kernels replace a unit by its linearization; the model itself just calls fn.
Unit = Callable[[str, Callable[[Params], jax.Array], Params], jax.Array]


def call_unit(name: str, fn: Callable[[Params], jax.Array], params: Params) -> jax.Array:
    """The identity wrapper: evaluate the unit as it is."""
    return fn(params)

_ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm computed in float32, cast back, then scaled (transformers' order of operations)."""
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * normed.astype(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, rope: RopeScaling) -> np.ndarray:
    """Inverse RoPE frequencies (float32), with linear or llama3 scaling applied."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (1.0 / (np.float32(theta) ** exponents)).astype(np.float32)
    if rope.rope_type == "linear":
        return (inv_freq / np.float32(rope.factor)).astype(np.float32)
    if rope.rope_type == "llama3":
        # Llama 3.1: long wavelengths divided by `factor`, short kept, the band between interpolated.
        old_len = rope.original_max_position_embeddings
        low_wavelen = old_len / rope.low_freq_factor
        high_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    return inv_freq


def rope_tables(positions: jax.Array, config: ModelConfig, dtype) -> tuple[jax.Array, jax.Array]:
    """cos and sin tables [B, T, D] for integer positions [B, T]."""
    inv_freq = jnp.asarray(rope_inv_freq(config.head_dim, config.rope_theta, config.rope))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE on x [B, T, heads, D] with tables [B, T, D]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def linear(x: jax.Array, params: Params, name: str) -> jax.Array:
    """y = x Wᵀ (+ b) with W stored (out, in) under `name.weight`."""
    y = x @ params[name + ".weight"].T
    bias = params.get(name + ".bias")
    return y if bias is None else y + bias


def attention_masks(attention_mask: jax.Array, config: ModelConfig) -> dict[int | None, jax.Array]:
    """Boolean [B, 1, T, T] masks (query, key) for each distinct window size among the layers."""
    t = attention_mask.shape[1]
    q_idx = jnp.arange(t)[:, None]
    k_idx = jnp.arange(t)[None, :]
    base = (k_idx <= q_idx)[None, None] & attention_mask[:, None, None, :].astype(bool)
    return {w: base if w is None else base & (k_idx > q_idx - w)[None, None] for w in set(config.sliding_windows)}


def attention(x: jax.Array, params: Params, prefix: str, config: ModelConfig, cos: jax.Array, sin: jax.Array,
              mask: jax.Array, unit: Unit = call_unit) -> jax.Array:
    """Grouped-query self-attention of one layer; x [B, T, hidden] -> [B, T, hidden]."""
    b, t, _ = x.shape
    h, k, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim

    def proj(name: str, inp: jax.Array) -> jax.Array:
        return unit(prefix + name, lambda p: linear(inp, p, prefix + name), params)

    q = apply_rope(proj("q_proj", x).reshape(b, t, h, d), cos, sin)
    key = apply_rope(proj("k_proj", x).reshape(b, t, k, d), cos, sin)
    value = proj("v_proj", x).reshape(b, t, k, d)
    q = q.reshape(b, t, k, h // k, d)  # query heads grouped by the key/value head they share
    acc = jnp.promote_types(x.dtype, jnp.float32)  # softmax in float32 (float64 when the model is)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", q, key, preferred_element_type=acc) * (d ** -0.5)
    scores = jnp.where(mask[:, :, None], scores, jnp.finfo(acc).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs, value).reshape(b, t, h * d)
    return proj("o_proj", out)


def mlp(x: jax.Array, params: Params, prefix: str, config: ModelConfig) -> jax.Array:
    """Gated MLP: down(act(gate(x)) * up(x))."""
    act = _ACTIVATIONS[config.hidden_act]
    return linear(act(linear(x, params, prefix + "gate_proj")) * linear(x, params, prefix + "up_proj"),
                  params, prefix + "down_proj")


def decoder_layer(x: jax.Array, params: Params, i: int, config: ModelConfig, cos: jax.Array, sin: jax.Array,
                  mask: jax.Array, unit: Unit = call_unit) -> jax.Array:
    """Pre-norm residual block: attention then MLP."""
    p = layer_prefix(i)
    h = rms_norm(x, params[p + "input_layernorm.weight"], config.rms_norm_eps)
    x = x + unit(p + "self_attn", lambda q: attention(h, q, p + "self_attn.", config, cos, sin, mask, unit), params)
    h = rms_norm(x, params[p + "post_attention_layernorm.weight"], config.rms_norm_eps)
    return x + unit(p + "mlp", lambda q: mlp(h, q, p + "mlp.", config), params)


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Position ids that skip padding: the count of real tokens before each token (pads get 0)."""
    return jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0).astype(jnp.int32)


def forward(params: Params, config: ModelConfig, input_ids: jax.Array, attention_mask: jax.Array | None = None,
            position_ids: jax.Array | None = None, unit: Unit = call_unit) -> jax.Array:
    """Logits [B, T, vocab] for token ids [B, T]; `attention_mask` (1 = token, 0 = pad) allows any padding side.

    Position ids default to the running count of real tokens, so a left-padded prompt gets the same
    positions as the unpadded one (what generation needs). Logits at padded positions are meaningless.
    `unit` wraps every projection, attention block and MLP block (see `Unit`); the default just calls it.
    """
    if attention_mask is None:
        attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    if position_ids is None:
        position_ids = positions_from_mask(attention_mask)
    embed = params["model.embed_tokens.weight"]
    x = embed[input_ids]
    cos, sin = rope_tables(position_ids, config, x.dtype)
    masks = attention_masks(attention_mask, config)
    for i in range(config.num_hidden_layers):
        x = decoder_layer(x, params, i, config, cos, sin, masks[config.sliding_windows[i]], unit)
    x = rms_norm(x, params["model.norm.weight"], config.rms_norm_eps)
    head = embed if config.tie_word_embeddings else params["lm_head.weight"]
    return x @ head.T
