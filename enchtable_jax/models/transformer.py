"""Causal-LM forward pass of the Llama / Mistral / Qwen2 families, as a pure function of the params.

`params` is a flat dict keyed by Hugging Face tensor names with weights in (out, in) layout; the
function reads only the names of `tensors.expected_shapes`, so extra entries are ignored. The
numerics follow transformers' PyTorch implementation: RMSNorm and softmax in float32, RoPE tables in
float32 cast to the compute dtype, rotate-half RoPE, grouped-query attention.

`forward_cached` runs the same layers over a key/value cache (`KVCache`): a prompt is written into
it once (prefill), then one token per call (decoding). Cache slots play the role of the padded
sequence's indices, so positions (running count of real tokens), causal order and sliding windows
mean exactly what they mean in `forward`; the cache holds every slot, so windows are masks, not
rolling buffers.

Shapes: B batch, T tokens, S cache slots, H query heads, K key/value heads, D head_dim.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from enchtable_jax.models.activations import ACTIVATIONS
from enchtable_jax.models.config import ModelConfig, RopeScaling
from enchtable_jax.models.tensors import layer_prefix

Params = Mapping[str, jax.Array]
# unit(name, fn, params) evaluates the sub-network `name` as fn(params). It is the one seam through which
# the kernels replace a unit by its linearization; the model itself just calls fn. Each decoder layer i
# passes "model.layers.{i}." + self_attn, self_attn.{q,k,v,o}_proj, mlp, mlp.{gate,up,down}_proj: every
# block and every projection, so each tensor under those names is reachable by a scope. The kernels check
# at trace time that the forward really reached every unit a scope names.
Unit = Callable[[str, Callable[[Params], jax.Array], Params], jax.Array]


def call_unit(name: str, fn: Callable[[Params], jax.Array], params: Params) -> jax.Array:
    """The identity wrapper: evaluate the unit as it is."""
    return fn(params)


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


def projection(x: jax.Array, params: Params, name: str, unit: Unit = call_unit) -> jax.Array:
    """`linear` evaluated through the seam as the unit `name` (e.g. "model.layers.3.mlp.up_proj")."""
    return unit(name, lambda p: linear(x, p, name), params)


def attention_masks(attention_mask: jax.Array, config: ModelConfig,
                    query_slots: jax.Array | None = None) -> dict[int | None, jax.Array]:
    """Boolean [B, 1, Q, S] masks (query, key) for each distinct window size among the layers.

    Keys are the S slots of `attention_mask` [B, S]; queries sit at `query_slots` [Q] (default: every slot).
    A query sees a key at or before its own slot that holds a token and, in a window w, lies within w slots.
    """
    k_idx = jnp.arange(attention_mask.shape[1])[None, :]
    q_idx = (k_idx[0] if query_slots is None else query_slots)[:, None]
    base = (k_idx <= q_idx)[None, None] & attention_mask[:, None, None, :].astype(bool)
    return {w: base if w is None else base & (k_idx > q_idx - w)[None, None] for w in set(config.sliding_windows)}


LayerKV = tuple[jax.Array, jax.Array, jax.Array]  # one layer's cache: keys, values [B, S, K, D], write slot (int32)


def self_attention(x: jax.Array, params: Params, prefix: str, config: ModelConfig, cos: jax.Array, sin: jax.Array,
                   mask: jax.Array, unit: Unit = call_unit,
                   cache: LayerKV | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Grouped-query self-attention of one layer: (output [B, T, hidden], keys, values it attended to).

    Without a cache the keys/values are x's own [B, T, K, D] and `mask` is [B, 1, T, T]; with one, x's
    keys/values are written into it at the write slot and the queries attend to all S slots
    (`mask` [B, 1, T, S]); the returned keys/values are then the updated cache.
    """
    b, t, _ = x.shape
    h, k, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim

    def proj(name: str, inp: jax.Array) -> jax.Array:
        return projection(inp, params, prefix + name, unit)

    q = apply_rope(proj("q_proj", x).reshape(b, t, h, d), cos, sin)
    key = apply_rope(proj("k_proj", x).reshape(b, t, k, d), cos, sin)
    value = proj("v_proj", x).reshape(b, t, k, d)
    if cache is not None:
        cached_keys, cached_values, slot = cache
        key = jax.lax.dynamic_update_slice_in_dim(cached_keys, key.astype(cached_keys.dtype), slot, axis=1)
        value = jax.lax.dynamic_update_slice_in_dim(cached_values, value.astype(cached_values.dtype), slot, axis=1)
    q = q.reshape(b, t, k, h // k, d)  # query heads grouped by the key/value head they share
    acc = jnp.promote_types(x.dtype, jnp.float32)  # softmax in float32 (float64 when the model is)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", q, key.astype(x.dtype), preferred_element_type=acc) * (d ** -0.5)
    scores = jnp.where(mask[:, :, None], scores, jnp.finfo(acc).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs, value.astype(x.dtype)).reshape(b, t, h * d)
    return proj("o_proj", out), key, value


def attention(x: jax.Array, params: Params, prefix: str, config: ModelConfig, cos: jax.Array, sin: jax.Array,
              mask: jax.Array, unit: Unit = call_unit) -> jax.Array:
    """Grouped-query self-attention of one layer without a cache; x [B, T, hidden] -> [B, T, hidden]."""
    return self_attention(x, params, prefix, config, cos, sin, mask, unit)[0]


def mlp(x: jax.Array, params: Params, prefix: str, config: ModelConfig, unit: Unit = call_unit) -> jax.Array:
    """Gated MLP: down(act(gate(x)) * up(x)), each projection through the seam."""
    act = ACTIVATIONS[config.hidden_act]
    gated = act(projection(x, params, prefix + "gate_proj", unit)) * projection(x, params, prefix + "up_proj", unit)
    return projection(gated, params, prefix + "down_proj", unit)


def decoder_layer(x: jax.Array, params: Params, i: int, config: ModelConfig, cos: jax.Array, sin: jax.Array,
                  mask: jax.Array, unit: Unit = call_unit,
                  cache: LayerKV | None = None) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """Pre-norm residual block, attention then MLP: (new x, the layer's updated (keys, values) or None).

    With a cache the attention block is evaluated directly, not through `unit` (its output is a tuple;
    linearization never decodes), while its projections and the MLP still go through `unit`.
    """
    p = layer_prefix(i)
    h = rms_norm(x, params[p + "input_layernorm.weight"], config.rms_norm_eps)
    if cache is None:
        x = x + unit(p + "self_attn", lambda q: attention(h, q, p + "self_attn.", config, cos, sin, mask, unit), params)
        kv = None
    else:
        out, keys, values = self_attention(h, params, p + "self_attn.", config, cos, sin, mask, unit, cache)
        x, kv = x + out, (keys, values)
    h = rms_norm(x, params[p + "post_attention_layernorm.weight"], config.rms_norm_eps)
    return x + unit(p + "mlp", lambda q: mlp(h, q, p + "mlp.", config, unit), params), kv


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Position ids that skip padding: the count of real tokens before each token (pads get 0)."""
    return jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0).astype(jnp.int32)


def _layers(params: Params, config: ModelConfig, input_ids: jax.Array | None, position_ids: jax.Array,
            masks: Mapping[int | None, jax.Array], unit: Unit, caches: Sequence[LayerKV] | None,
            last_only: bool, inputs_embeds: jax.Array | None = None,
            tail: int | None = None) -> tuple[jax.Array, list[tuple[jax.Array, jax.Array]]]:
    """Embedding (or `inputs_embeds` [B, T, hidden] given instead of ids), the decoder layers, final norm and head
    (on the last `tail` positions only, when given): (logits, updated per-layer caches)."""
    embed = params["model.embed_tokens.weight"]
    x = embed[input_ids] if inputs_embeds is None else inputs_embeds
    cos, sin = rope_tables(position_ids, config, x.dtype)
    updated = []
    for i in range(config.num_hidden_layers):
        x, kv = decoder_layer(x, params, i, config, cos, sin, masks[config.sliding_windows[i]], unit,
                              None if caches is None else caches[i])
        updated.append(kv)
    if last_only:
        x = x[:, -1:]
    elif tail is not None:
        x = x[:, x.shape[1] - tail:]
    x = rms_norm(x, params["model.norm.weight"], config.rms_norm_eps)
    head = embed if config.tie_word_embeddings else params["lm_head.weight"]
    return x @ head.T, updated


def forward(params: Params, config: ModelConfig, input_ids: jax.Array | None, attention_mask: jax.Array | None = None,
            position_ids: jax.Array | None = None, unit: Unit = call_unit, *, inputs_embeds: jax.Array | None = None,
            tail: int | None = None) -> jax.Array:
    """Logits [B, T, vocab] for token ids [B, T]; `attention_mask` (1 = token, 0 = pad) allows any padding side.

    Position ids default to the running count of real tokens, so a left-padded prompt gets the same
    positions as the unpadded one (what generation needs). Logits at padded positions are meaningless.
    Ranks and shapes are checked when traced (chex; nothing per call under jit).
    `unit` wraps every projection, attention block and MLP block (see `Unit`); the default just calls it.
    `inputs_embeds` [B, T, hidden], given with `input_ids=None`, replaces the embedding lookup (a gradient with
    respect to one-hot tokens flows through it: attack/gcg.py). `tail`: logits [B, tail, vocab] of the last `tail`
    positions only (the head's matmul skipped elsewhere).
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("forward: give exactly one of input_ids and inputs_embeds")
    if inputs_embeds is not None:
        chex.assert_rank(inputs_embeds, 3, custom_message="forward: inputs_embeds are [batch, tokens, hidden]")
        token_shaped = jax.ShapeDtypeStruct(inputs_embeds.shape[:2], jnp.int32)  # for the shape checks below
    else:
        chex.assert_rank(input_ids, 2, custom_message="forward: input_ids are [batch, tokens]")
        token_shaped = input_ids
    if attention_mask is None:
        attention_mask = jnp.ones(token_shaped.shape, jnp.int32)
    if position_ids is None:
        position_ids = positions_from_mask(attention_mask)
    chex.assert_equal_shape([token_shaped, attention_mask, position_ids],
                            custom_message="forward: input_ids, attention_mask, position_ids")
    masks = attention_masks(attention_mask, config)
    return _layers(params, config, input_ids, position_ids, masks, unit, None, last_only=False,
                   inputs_embeds=inputs_embeds, tail=tail)[0]


@functools.partial(jax.tree_util.register_dataclass, data_fields=["keys", "values", "mask", "length"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys and values of every layer over S slots, filled left to right by `forward_cached`.

    mask [B, S] marks slots holding a real token (0 = padding or not yet written); `length` (int32
    scalar) is the number of slots written, the same for every row: prompts are left-padded to one width.
    """

    keys: tuple[jax.Array, ...]  # per layer [B, S, K, D]
    values: tuple[jax.Array, ...]
    mask: jax.Array
    length: jax.Array


def init_cache(config: ModelConfig, batch: int, slots: int, dtype) -> KVCache:
    """An empty cache of `slots` slots for `batch` rows, keys and values in `dtype` (the compute dtype)."""
    shape = (batch, slots, config.num_key_value_heads, config.head_dim)
    layers = config.num_hidden_layers
    return KVCache(keys=tuple(jnp.zeros(shape, dtype) for _ in range(layers)),
                   values=tuple(jnp.zeros(shape, dtype) for _ in range(layers)),
                   mask=jnp.zeros((batch, slots), jnp.int32), length=jnp.zeros((), jnp.int32))


def forward_cached(params: Params, config: ModelConfig, input_ids: jax.Array, attention_mask: jax.Array,
                   cache: KVCache, last_only: bool = True) -> tuple[jax.Array, KVCache]:
    """Run tokens [B, T] written at cache slots [length, length + T): (logits, updated cache).

    The logits equal `forward`'s on the whole sequence of slots so far (same positions, masks and
    windows): [B, vocab] of the last token when `last_only` (decoding), else [B, T, vocab]. The caller
    keeps length + T <= S: past the end, `dynamic_update_slice` would clamp the write onto earlier slots.
    """
    chex.assert_rank(input_ids, 2, custom_message="forward_cached: input_ids are [batch, tokens]")
    chex.assert_equal_shape([input_ids, attention_mask], custom_message="forward_cached: input_ids, attention_mask")
    t = input_ids.shape[1]
    mask = jax.lax.dynamic_update_slice_in_dim(cache.mask, attention_mask.astype(jnp.int32), cache.length, axis=1)
    position_ids = jax.lax.dynamic_slice_in_dim(positions_from_mask(mask), cache.length, t, axis=1)
    masks = attention_masks(mask, config, query_slots=cache.length + jnp.arange(t))
    layer_caches = [(k, v, cache.length) for k, v in zip(cache.keys, cache.values)]
    logits, updated = _layers(params, config, input_ids, position_ids, masks, call_unit, layer_caches, last_only)
    new = KVCache(keys=tuple(k for k, _ in updated), values=tuple(v for _, v in updated), mask=mask,
                  length=cache.length + t)
    return (logits[:, 0] if last_only else logits), new
