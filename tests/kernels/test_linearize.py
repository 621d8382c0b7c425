"""The linearized forward against a float64 central-difference oracle, for every scope."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from enchtable_jax.models.model import Model, apply
from enchtable_jax.kernels.linearize import linearized_forward, linearized_logits
from enchtable_jax.kernels.scopes import resolve_scope, unit_params
from enchtable_jax.models import init_params, preset_config
from enchtable_jax.models.transformer import forward

CONFIG = preset_config("tiny", "qwen2", num_hidden_layers=2, vocab_size=64, hidden_size=32, intermediate_size=48)
SCOPES = ["ffn", "attn", "attn_block", "attn_ffn", "model", "attn_block+ffn"]
VARIANT_SCOPES = ["attn_block+ffn", "model"]  # per-unit and whole-model: also checked under jit (chex.variants)
EPS = 1e-4


def _perturbed(params, names, seed, scale):
    keys = jax.random.split(jax.random.key(seed), len(names))
    return {n: params[n] + scale * jax.random.normal(k, params[n].shape, params[n].dtype) for k, n in zip(keys, names)}


def _setup(dtype):
    params0 = init_params(CONFIG, seed=0, dtype=dtype, std=0.1)
    params0 = {**params0, **_perturbed(params0, [n for n in params0 if "norm" in n or "bias" in n], 3, 0.1)}
    ids = jax.random.randint(jax.random.key(1), (2, 7), 0, CONFIG.vocab_size)
    mask = jnp.array([[1] * 7, [1] * 5 + [0] * 2])
    return params0, ids, mask


def _central_difference_oracle(params0, theta, scope, ids, mask):
    """f(θ0) + [f(θ0 + εΔ) − f(θ0 − εΔ)] / 2ε, per unit (or for the whole model), in float64."""
    delta = {n: theta[n] - params0[n] for n in scope.params}

    def shifted(p, names, sign):
        return {**p, **{n: params0[n] + sign * EPS * delta[n] for n in names}}

    if scope.whole_model:
        f = lambda p: forward(p, CONFIG, ids, mask)  # noqa: E731
        return f(params0) + (f(shifted(params0, scope.params, 1)) - f(shifted(params0, scope.params, -1))) / (2 * EPS)
    owned = unit_params(scope)

    def unit(name, fn, current):
        names = owned.get(name)
        if not names:
            return fn(current)
        return fn(current) + (fn(shifted(current, names, 1)) - fn(shifted(current, names, -1))) / (2 * EPS)

    return forward(params0, CONFIG, ids, mask, unit=unit)


def _assert_matches_central_differences(scope_name, linearize):
    """`linearize` (linearized_forward, jitted or not) in float64 to 1e-7, the float32 training path to 2e-5."""
    scope = resolve_scope(CONFIG, scope_name)
    with jax.enable_x64(True):
        params0, ids, mask = _setup(jnp.float64)
        theta = _perturbed(params0, scope.params, 7, 0.05)
        oracle = np.asarray(_central_difference_oracle(params0, theta, scope, ids, mask))
        delta = {n: theta[n] - params0[n] for n in scope.params}
        ours64 = np.asarray(linearize(params0, delta, CONFIG, scope, ids, mask))
    real = np.asarray(mask, bool)
    scale = np.abs(oracle[real]).max()
    assert np.abs(ours64[real] - oracle[real]).max() / scale < 1e-7
    # The float32 path (what training uses) agrees to float32 accuracy.
    model0 = Model(CONFIG, {n: v.astype(jnp.float32) for n, v in params0.items()})
    ours32 = np.asarray(linearized_logits(model0, {n: v.astype(jnp.float32) for n, v in theta.items()}, ids, scope,
                                          mask))
    assert np.abs(ours32[real] - oracle[real]).max() / scale < 2e-5


@pytest.mark.parametrize("scope_name", [s for s in SCOPES if s not in VARIANT_SCOPES])
def test_linearized_logits_match_central_differences(scope_name):
    _assert_matches_central_differences(scope_name, linearized_forward)


class LinearizedUnderJitTest(chex.TestCase):
    """Per-unit and whole-model linearization, jitted and not: tracing must not change the function."""

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*((s.replace("+", "_"), s) for s in VARIANT_SCOPES))
    def test_matches_central_differences(self, scope_name):
        _assert_matches_central_differences(scope_name,
                                            self.variant(linearized_forward, static_argnames=("config", "scope")))


@pytest.mark.parametrize("scope_name,equals_plain", [("attn", True), ("ffn", False), ("attn_block", False),
                                                     ("model", False)])
def test_linear_units_equal_the_plain_model(scope_name, equals_plain):
    params0, ids, mask = _setup(jnp.float32)
    model0 = Model(CONFIG, params0)
    scope = resolve_scope(CONFIG, scope_name)
    theta = _perturbed(params0, scope.params, 11, 0.1)
    lin = np.asarray(linearized_logits(model0, theta, ids, scope, mask))
    plain = np.asarray(apply(Model(CONFIG, {**params0, **theta}), ids, mask))
    real = np.asarray(mask, bool)
    rel = np.abs(lin[real] - plain[real]).max() / np.abs(plain[real]).max()
    assert (rel < 1e-5) if equals_plain else (rel > 1e-3), rel


def test_at_theta0_the_linearization_is_the_model():
    params0, ids, mask = _setup(jnp.float32)
    model0 = Model(CONFIG, params0)
    for name in ("ffn", "model"):
        scope = resolve_scope(CONFIG, name)
        lin = linearized_logits(model0, {n: model0.params[n] for n in scope.params}, ids, scope, mask)
        np.testing.assert_allclose(lin, apply(model0, ids, mask), rtol=1e-5, atol=1e-5)


def test_missing_scope_tensor_is_named():
    params0, ids, _ = _setup(jnp.float32)
    with pytest.raises(KeyError, match="model.layers.0.mlp.gate_proj.weight"):
        linearized_logits(Model(CONFIG, params0), {}, ids, "ffn")
