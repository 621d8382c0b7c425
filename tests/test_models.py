"""Forward pass, config resolution, RoPE frequencies and tensor table, checked against independent oracles.

Oracles: transformers' PyTorch models (logits, RoPE init functions, state_dict names/shapes) and float64
numpy re-derivations written here. Every parity test with a feature that could silently be dropped
(RoPE scaling, theta, sliding windows, biases) also checks that dropping it breaks the parity, so the
test is sensitive to that feature.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import enchtable_jax
from enchtable_jax.models.model import Model
from enchtable_jax.models import ConfigError, ModelConfig, RopeScaling, expected_shapes
from enchtable_jax.models import init_params, preset_config
from enchtable_jax.models.transformer import forward, forward_cached, init_cache, rope_inv_freq

F32_TOL = 1e-5
T = 12  # sequence length; every sliding window below is shorter


# ----------------------------------------------------------------------------------------------------------
# helpers


def padded_batch(vocab: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three rows of T tokens: unpadded, right-padded (7 real) and left-padded (9 real); pads hold random ids."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(3, T)).astype(np.int64)
    mask = np.ones((3, T), np.int64)
    mask[1, 7:] = 0
    mask[2, :3] = 0
    return ids, mask


def torch_logits(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """transformers' logits with positions that count real tokens (this package's convention)."""
    ids_t = torch.as_tensor(ids, dtype=torch.long)
    mask_t = torch.as_tensor(mask, dtype=torch.long)
    pos = (mask_t.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(input_ids=ids_t, attention_mask=mask_t, position_ids=pos).logits
    return out.float().numpy()


def ours(model: Model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return np.asarray(enchtable_jax.apply(model, ids, mask).astype(jnp.float32))


def rel_err(a: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> float:
    """max|a - ref| / max|ref| over non-padded positions (NaN anywhere there makes it NaN, i.e. a failure)."""
    sel = mask.astype(bool)
    a, ref = np.asarray(a, np.float64)[sel], np.asarray(ref, np.float64)[sel]
    return float(np.max(np.abs(a - ref)) / np.max(np.abs(ref)))


def with_config(model: Model, **changes) -> Model:
    return Model(dataclasses.replace(model.config, **changes), model.params, model.source)


def without_biases(model: Model) -> Model:
    return Model(model.config, {k: v for k, v in model.params.items() if not k.endswith(".bias")}, model.source)


# ----------------------------------------------------------------------------------------------------------
# 1. float32 logit parity with transformers

L2 = dict(num_hidden_layers=2)
LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8)

# id -> (model_type, config overrides, {ablation name: function Model -> Model that drops a feature})
PARITY_CASES = {
    "llama-untied-gqa": ("llama", dict(**L2), {}),
    "llama-tied-mha-theta": ("llama", dict(**L2, tie_word_embeddings=True, num_key_value_heads=4, rope_theta=37.0),
                             {"default theta": lambda m: with_config(m, rope_theta=10000.0)}),
    "llama-biases-headdim": ("llama", dict(**L2, attention_bias=True, mlp_bias=True, head_dim=24),
                             {"biases dropped": without_biases}),
    "llama-rope-linear": ("llama", dict(**L2, rope_parameters=dict(rope_type="linear", rope_theta=10000.0,
                                                                     factor=4.0)),
                          {"scaling ignored": lambda m: with_config(m, rope=RopeScaling())}),
    "llama-rope-llama3": ("llama", dict(**L2, head_dim=8, rope_parameters=LLAMA3_ROPE),
                          {"scaling ignored": lambda m: with_config(m, rope=RopeScaling())}),
    "mistral-window-headdim-mqa": ("mistral", dict(**L2, sliding_window=4, head_dim=8, num_key_value_heads=1),
                                   {"window ignored": lambda m: with_config(m, sliding_windows=(None, None))}),
    "mistral-tied-nowindow-mha": ("mistral", dict(**L2, sliding_window=None, tie_word_embeddings=True,
                                                  num_key_value_heads=4), {}),
    "qwen2-tied-window": ("qwen2", dict(**L2, tie_word_embeddings=True, use_sliding_window=True, sliding_window=3,
                                        max_window_layers=1),
                          {"window ignored": lambda m: with_config(m, sliding_windows=(None, None)),
                           "biases dropped": without_biases}),
    "qwen2-untied-mha-theta": ("qwen2", dict(**L2, num_key_value_heads=4, rope_theta=50.0),
                               {"default theta": lambda m: with_config(m, rope_theta=10000.0)}),
}


@pytest.mark.parametrize("case", list(PARITY_CASES))
def test_logits_match_transformers_f32(hf_model, case):
    model_type, overrides, ablations = PARITY_CASES[case]
    folder, torch_model = hf_model(model_type, **overrides)
    model = enchtable_jax.load(folder)
    assert all(v.dtype == jnp.float32 for v in model.params.values())
    ids, mask = padded_batch(model.config.vocab_size, seed=len(case))
    ref = torch_logits(torch_model, ids, mask)
    got = ours(model, ids, mask)
    assert got.shape == ref.shape == (3, T, model.config.vocab_size)
    err = rel_err(got, ref, mask)
    assert err <= F32_TOL, f"{case}: relative error {err:.2e}"
    # each padded row on its own also matches (a padding bug could hide behind the full row's max)
    for row in (1, 2):
        assert rel_err(got[row:row + 1], ref[row:row + 1], mask[row:row + 1]) <= F32_TOL
    # sensitivity: dropping the feature under test must break parity by far more than the tolerance
    for name, ablate in ablations.items():
        wrong = rel_err(ours(ablate(model), ids, mask), ref, mask)
        assert wrong > 100 * F32_TOL, f"{case}: parity holds with {name} ({wrong:.2e}); the test is not sensitive"


def test_resolved_features_of_parity_configs(hf_model):
    """The configs above really exercise what they claim (read back from the saved config.json)."""
    cfg = lambda mt, **o: enchtable_jax.load(hf_model(mt, **o)[0]).config  # noqa: E731
    c = cfg("qwen2", **PARITY_CASES["qwen2-tied-window"][1])
    assert c.sliding_windows == (None, 3) and c.qkv_bias and not c.o_bias and c.tie_word_embeddings
    c = cfg("llama", **PARITY_CASES["llama-biases-headdim"][1])
    assert (c.qkv_bias, c.o_bias, c.mlp_bias, c.head_dim) == (True, True, True, 24)
    assert c.head_dim != c.hidden_size // c.num_attention_heads
    c = cfg("llama", **PARITY_CASES["llama-rope-llama3"][1])
    assert c.rope == RopeScaling("llama3", 8.0, 1.0, 4.0, 8)


# ----------------------------------------------------------------------------------------------------------
# 2. bfloat16


@pytest.mark.parametrize("model_type,overrides", [
    ("llama", dict(**L2, attention_bias=True, rope_parameters=LLAMA3_ROPE)),
    ("qwen2", dict(**L2, tie_word_embeddings=True, use_sliding_window=True, sliding_window=4, max_window_layers=1)),
], ids=["llama", "qwen2"])
def test_bf16_logits_within_transformers_error(hf_model, model_type, overrides):
    folder, torch_bf16 = hf_model(model_type, dtype="bfloat16", **overrides)
    torch_f32 = copy.deepcopy(torch_bf16).float()  # the same bf16-rounded weights, computed in float32
    ids, mask = padded_batch(torch_bf16.config.vocab_size, seed=3)
    ref32 = torch_logits(torch_f32, ids, mask)
    theirs = rel_err(torch_logits(torch_bf16, ids, mask), ref32, mask)

    model = enchtable_jax.load(folder)
    assert {str(v.dtype) for v in model.params.values()} == {"bfloat16"}, "loading must keep the stored bf16"
    got = enchtable_jax.apply(model, ids, mask)
    assert got.dtype == jnp.bfloat16
    err = rel_err(np.asarray(got.astype(jnp.float32)), ref32, mask)
    assert err <= 2 * theirs + 2e-3, f"bf16 error {err:.2e} vs transformers' {theirs:.2e}"
    assert err <= 3e-2
    assert err > 0  # really computed in bf16, not silently upcast

    up = enchtable_jax.load(folder, dtype=jnp.float32)
    assert {str(v.dtype) for v in up.params.values()} == {"float32"}
    chex.assert_trees_all_equal(up.params, {n: v.astype(jnp.float32) for n, v in model.params.items()},
                                strict=True)  # the upcast is exact
    assert rel_err(ours(up, ids, mask), ref32, mask) <= F32_TOL


def test_input_shapes_are_checked_when_traced():
    """Ranks and shapes of the token inputs are checked while tracing: eval_shape computes no value."""
    config = preset_config("tiny", "llama", num_hidden_layers=1)
    params = init_params(config, seed=0)
    ints = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
    assert jax.eval_shape(lambda i, m: forward(params, config, i, m), ints(2, 5), ints(2, 5)).shape == (
        2, 5, config.vocab_size)
    with pytest.raises(AssertionError, match=r"(?s)rank.*forward: input_ids are \[batch, tokens\]"):
        jax.eval_shape(lambda i: forward(params, config, i), ints(5))
    with pytest.raises(AssertionError, match=r"(?s)shape.*forward: input_ids, attention_mask"):
        jax.eval_shape(lambda i, m: forward(params, config, i, m), ints(2, 5), ints(2, 4))
    with pytest.raises(AssertionError, match=r"(?s)shape.*forward: input_ids, attention_mask, position_ids"):
        jax.eval_shape(lambda i, p: forward(params, config, i, position_ids=p), ints(2, 5), ints(5))
    cache = init_cache(config, 2, 8, jnp.float32)
    with pytest.raises(AssertionError, match=r"(?s)rank.*forward_cached: input_ids"):
        jax.eval_shape(lambda i, m: forward_cached(params, config, i, m, cache), ints(5), ints(5))
    with pytest.raises(AssertionError, match=r"(?s)shape.*forward_cached: input_ids, attention_mask"):
        jax.eval_shape(lambda i, m: forward_cached(params, config, i, m, cache), ints(2, 1), ints(2, 2))


# ----------------------------------------------------------------------------------------------------------
# 3. left padding invariance


@pytest.mark.parametrize("model_type,overrides", [
    ("llama", dict(**L2, rope_parameters=LLAMA3_ROPE)),
    ("mistral", dict(**L2, sliding_window=4)),
], ids=["llama3-rope", "mistral-window"])
def test_left_padding_invariance(hf_model, model_type, overrides):
    folder, _ = hf_model(model_type, **overrides)
    model = enchtable_jax.load(folder)
    rng = np.random.default_rng(7)
    n, pad = 9, 3
    seq = rng.integers(0, model.config.vocab_size, size=(1, n))
    alone = ours(model, seq, np.ones((1, n), np.int64))
    padded_ids = np.concatenate([rng.integers(0, model.config.vocab_size, size=(1, pad)), seq], axis=1)
    padded_mask = np.concatenate([np.zeros((1, pad), np.int64), np.ones((1, n), np.int64)], axis=1)
    padded = ours(model, padded_ids, padded_mask)
    real = padded[:, pad:]
    assert np.all(np.isfinite(real))
    err = float(np.max(np.abs(real - alone)) / np.max(np.abs(alone)))
    assert err <= F32_TOL, f"left-padded logits differ from unpadded ones by {err:.2e}"
    # batched with the unpadded sequence (right-padded to the same length) gives the same again
    batch_ids = np.concatenate([padded_ids, np.concatenate([seq, padded_ids[:, :pad]], axis=1)])
    batch_mask = np.concatenate([padded_mask, padded_mask[:, ::-1]])
    both = ours(model, batch_ids, batch_mask)
    assert float(np.max(np.abs(both[0, pad:] - alone[0])) / np.max(np.abs(alone))) <= F32_TOL
    assert float(np.max(np.abs(both[1, :n] - alone[0])) / np.max(np.abs(alone))) <= F32_TOL
    # sensitivity: treating the pads as tokens changes the real positions' logits
    unmasked = ours(model, padded_ids, np.ones_like(padded_mask))[:, pad:]
    assert float(np.max(np.abs(unmasked - alone)) / np.max(np.abs(alone))) > 100 * F32_TOL


# ----------------------------------------------------------------------------------------------------------
# 4. config errors

BASE = dict(model_type="llama", vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=2)


@pytest.mark.parametrize("raw,needles", [
    ({**BASE, "model_type": "gpt2"}, ["'gpt2'", "model_type"]),
    ({k: v for k, v in BASE.items() if k != "model_type"}, ["model_type", "None"]),
    ({**BASE, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, ["'yarn'", "rope"]),
    ({**BASE, "rope_scaling": {"type": "dynamic", "factor": 2.0}}, ["'dynamic'"]),
    ({k: v for k, v in BASE.items() if k != "hidden_size"}, ["'hidden_size'"]),
    ({k: v for k, v in BASE.items() if k != "vocab_size"}, ["'vocab_size'"]),
    ({**BASE, "intermediate_size": 0}, ["'intermediate_size'", "0"]),
    ({**BASE, "num_attention_heads": 6, "num_key_value_heads": 4}, ["num_attention_heads", "num_key_value_heads",
                                                                     "(6)", "(4)"]),
    ({**BASE, "rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}},
     ["'llama3'", "low_freq_factor", "high_freq_factor"]),
    ({**BASE, "hidden_act": "swish_xyz"}, ["'swish_xyz'"]),
    ({**BASE, "num_hidden_layers": 2 ** 70}, ["'num_hidden_layers'", "4096"]),
], ids=["gpt2", "no-model-type", "yarn", "dynamic", "no-hidden", "no-vocab", "zero-ffn", "heads-6-kv-4",
        "llama3-missing", "bad-act", "layers-2^70"])
def test_config_errors_name_the_field(raw, needles):
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_hf(raw, source="some/dir/config.json")
    message = str(info.value)
    assert message.startswith("some/dir/config.json")
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


def test_config_error_is_value_error_and_valid_base_resolves():
    assert issubclass(ConfigError, ValueError)
    c = ModelConfig.from_hf(BASE)
    assert (c.head_dim, c.num_key_value_heads, c.rope_theta, c.rope) == (4, 2, 10000.0, RopeScaling())
    assert ModelConfig.from_hf({k: v for k, v in BASE.items() if k != "num_key_value_heads"}).num_key_value_heads == 4


# ----------------------------------------------------------------------------------------------------------
# 5. RoPE inverse frequencies


def llama31_inv_freq_f64(head_dim: int, theta: float, factor: float, low_freq_factor: float,
                         high_freq_factor: float, old_context_len: int) -> np.ndarray:
    """Llama 3.1's frequency scaling, from its description, in float64 and one frequency at a time."""
    out = []
    for i in range(0, head_dim, 2):
        freq = 1.0 / theta ** (i / head_dim)
        wavelen = 2 * math.pi / freq
        if wavelen < old_context_len / high_freq_factor:  # high frequency: kept
            out.append(freq)
        elif wavelen > old_context_len / low_freq_factor:  # low frequency: interpolated by `factor`
            out.append(freq / factor)
        else:  # in between: blend the two
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            out.append((1 - smooth) * freq / factor + smooth * freq)
    return np.array(out)


ROPE_CONFIGS = {
    # head_dim 16, old context 64: wavelengths 6.3 | 20, 63 | 199 ... span all three bands
    "three-bands": dict(head_dim=16, rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                        original_max_position_embeddings=64),
    "llama-3.1-8b": dict(head_dim=128, rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                         original_max_position_embeddings=8192),
    "odd-factors": dict(head_dim=32, rope_theta=1000.0, factor=3.0, low_freq_factor=2.0, high_freq_factor=8.0,
                        original_max_position_embeddings=100),
}


@pytest.mark.parametrize("name", list(ROPE_CONFIGS))
def test_rope_inv_freq_llama3(name):
    p = ROPE_CONFIGS[name]
    hf_config = transformers.LlamaConfig(
        hidden_size=p["head_dim"] * 2, num_attention_heads=2, head_dim=p["head_dim"],
        rope_parameters=dict(rope_type="llama3", **{k: v for k, v in p.items() if k != "head_dim"}))
    config = ModelConfig.from_hf(hf_config.to_dict())
    got = rope_inv_freq(config.head_dim, config.rope_theta, config.rope)
    assert got.dtype == np.float32 and got.shape == (p["head_dim"] // 2,)

    ref_hf, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config)
    np.testing.assert_allclose(got, ref_hf.numpy(), rtol=2e-7, atol=0)
    ref64 = llama31_inv_freq_f64(p["head_dim"], p["rope_theta"], p["factor"], p["low_freq_factor"],
                                 p["high_freq_factor"], p["original_max_position_embeddings"])
    np.testing.assert_allclose(got, ref64, rtol=1e-6, atol=0)
    # the scaling acts: not every frequency equals the unscaled one, and not every one is divided by factor
    plain = 1.0 / p["rope_theta"] ** (np.arange(0, p["head_dim"], 2) / p["head_dim"])
    assert np.any(np.abs(ref64 / plain - 1) > 1e-3)
    assert np.any(np.abs(ref64 * p["factor"] / plain - 1) > 1e-3)
    if name == "three-bands":  # kept, blended and divided frequencies all occur
        ratio = ref64 / plain
        assert np.isclose(ratio[0], 1.0) and np.isclose(ratio[-1], 1 / p["factor"])
        assert np.any((ratio > 1 / p["factor"] + 1e-3) & (ratio < 1 - 1e-3))


@pytest.mark.parametrize("rope_parameters,head_dim", [
    (dict(rope_type="default", rope_theta=10000.0), 16),
    (dict(rope_type="default", rope_theta=1e6), 64),
    (dict(rope_type="linear", rope_theta=500.0, factor=2.5), 24),
], ids=["default", "default-1e6", "linear"])
def test_rope_inv_freq_default_and_linear(rope_parameters, head_dim):
    hf_config = transformers.LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, head_dim=head_dim,
                                         rope_parameters=rope_parameters)
    config = ModelConfig.from_hf(hf_config.to_dict())
    got = rope_inv_freq(config.head_dim, config.rope_theta, config.rope)
    if rope_parameters["rope_type"] == "default":
        ref, _ = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding.compute_default_rope_parameters(
            hf_config)
    else:
        ref, _ = ROPE_INIT_FUNCTIONS["linear"](hf_config)
    np.testing.assert_allclose(got, ref.numpy(), rtol=2e-7, atol=0)
    ref64 = (1.0 / rope_parameters["rope_theta"] ** (np.arange(0, head_dim, 2) / head_dim)
             / rope_parameters.get("factor", 1.0))
    np.testing.assert_allclose(got, ref64, rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------------------------------------
# 6. tensor table vs transformers' state_dict


@pytest.mark.parametrize("model_type,overrides", [
    ("llama", dict()),
    ("llama", dict(tie_word_embeddings=True, attention_bias=True, mlp_bias=True, head_dim=24)),
    ("mistral", dict(head_dim=8, num_key_value_heads=1)),
    ("qwen2", dict(tie_word_embeddings=True)),
    ("qwen2", dict(num_key_value_heads=4)),
], ids=["llama", "llama-tied-biases", "mistral", "qwen2-tied", "qwen2"])
def test_expected_shapes_match_state_dict(model_type, overrides):
    config_cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
                  "qwen2": transformers.Qwen2Config}[model_type]
    hf_config = config_cls(**{**dict(vocab_size=37, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2), **overrides})
    torch_model = transformers.AutoModelForCausalLM.from_config(hf_config)
    state = {k: tuple(v.shape) for k, v in torch_model.state_dict().items()}
    if hf_config.tie_word_embeddings:
        assert "lm_head.weight" in state  # transformers lists the tied head; the table must not require it
        del state["lm_head.weight"]
    shapes = expected_shapes(ModelConfig.from_hf(hf_config.to_dict()))
    assert shapes == state
    assert list(shapes) == list(state)  # same order too: files we write list tensors as transformers does
    assert next(iter(shapes)) == "model.embed_tokens.weight"
