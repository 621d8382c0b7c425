"""The contract between scopes and the forward's seam: the forward passes every block and projection to it, a
scope naming a unit the forward never reaches is refused when the step is traced, and one step of every scope
on every architecture moves every tensor of the scope (oracle: the plain forward's gradient)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from enchtable_jax.kernels import linearize
from enchtable_jax.kernels.linearize import linearized_forward, zero_delta
from enchtable_jax.kernels.scopes import UNITS, Scope, ScopeError, resolve_scope
from enchtable_jax.kernels.train_step import init_opt_state, make_train_step
from enchtable_jax.models import init_params, preset_config
from enchtable_jax.models import transformer
from enchtable_jax.models.transformer import forward, linear

SIZE = dict(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2)
ARCHITECTURES = {
    "llama-biases": preset_config("tiny", "llama", attention_bias=True, mlp_bias=True, **SIZE),
    "llama-tied": preset_config("tiny", "llama", tie_word_embeddings=True, **SIZE),
    "mistral-window": preset_config("tiny", "mistral", sliding_window=2, **SIZE),
    "qwen2": preset_config("tiny", "qwen2", **SIZE),
}
BLOCKS = ("self_attn", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
          "mlp", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
CONFIG = ARCHITECTURES["qwen2"]


def _params(config):
    params = init_params(config, seed=0, std=0.2)
    keys = jax.random.split(jax.random.key(4), len(params))
    return {n: v + 0.1 * jax.random.normal(k, v.shape) if n.endswith(("norm.weight", ".bias")) else v
            for k, (n, v) in zip(keys, params.items())}


def _batch():
    ids = jax.random.randint(jax.random.key(1), (2, 6), 0, SIZE["vocab_size"])
    mask = jnp.array([[1] * 6, [1] * 4 + [0] * 2])
    return {"input_ids": ids, "attention_mask": mask, "loss_mask": mask.at[:, :2].set(0)}


def _oracle_loss(params, config, batch):
    """Mean next-token cross-entropy over target tokens of the plain forward, written independently of train_step."""
    logits = forward(params, config, batch["input_ids"], batch["attention_mask"])[:, :-1]
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["input_ids"][:, 1:])
    weight = batch["loss_mask"][:, 1:]
    return jnp.sum(nll * weight) / jnp.sum(weight)


def test_forward_passes_every_block_and_projection_to_the_seam():
    reached = []

    def recording(name, fn, params):
        reached.append(name)
        return fn(params)

    params, batch = _params(CONFIG), _batch()
    logits = forward(params, CONFIG, batch["input_ids"], batch["attention_mask"], unit=recording)
    assert sorted(reached) == sorted(f"model.layers.{i}.{b}" for i in range(2) for b in BLOCKS)
    assert {s for suffixes in UNITS.values() for s in suffixes} <= set(BLOCKS)
    np.testing.assert_array_equal(logits, forward(params, CONFIG, batch["input_ids"], batch["attention_mask"]))


def _bogus_scope():
    ffn = resolve_scope(CONFIG, "ffn")
    return Scope(name="ffn", units=(*ffn.units, "model.layers.1.mlp.act_fn"), params=ffn.params)


@pytest.mark.parametrize("linearized", [True, False])
def test_a_unit_the_forward_never_reaches_is_refused_when_the_step_is_traced(linearized):
    params0, batch, scope = _params(CONFIG), _batch(), _bogus_scope()
    optimizer = optax.sgd(0.1)
    delta = zero_delta(params0, scope)
    step = make_train_step(CONFIG, scope, optimizer, linearized=linearized)
    with pytest.raises(ScopeError, match=r"scope 'ffn' names unit\(s\) model\.layers\.1\.mlp\.act_fn that the forward "
                                         r"never passes to its seam") as e:
        step(params0, delta, init_opt_state(optimizer, delta), batch)
    assert "model.layers.N.{mlp, mlp.down_proj," in str(e.value)  # what the scope could have named
    with pytest.raises(ScopeError, match="mlp.act_fn"):  # at trace time: no array is computed
        jax.eval_shape(lambda d: linearized_forward(params0, d, CONFIG, scope, batch["input_ids"]), delta)


def test_a_forward_that_skips_a_projection_is_refused(monkeypatch):
    """The bug this contract closes: MLP projections computed beside the seam, a scope naming them trains nothing."""

    def mlp_beside_the_seam(x, params, prefix, config, unit=transformer.call_unit):
        act = jax.nn.silu
        return linear(act(linear(x, params, prefix + "gate_proj")) * linear(x, params, prefix + "up_proj"),
                      params, prefix + "down_proj")

    params0, batch = _params(CONFIG), _batch()
    units = tuple(f"model.layers.{i}.mlp.{p}_proj" for i in range(2) for p in ("gate", "up", "down"))
    scope = Scope(name="mlp-projections", units=units, params=resolve_scope(CONFIG, "ffn").params)
    delta = {n: jnp.ones_like(params0[n]) for n in scope.params}
    moved = linearized_forward(params0, delta, CONFIG, scope, batch["input_ids"], batch["attention_mask"])
    at0 = forward(params0, CONFIG, batch["input_ids"], batch["attention_mask"])
    assert float(jnp.abs(moved - at0).max()) > 1e-3  # through the seam, the projections are linearized and move
    monkeypatch.setattr(transformer, "mlp", mlp_beside_the_seam)
    with pytest.raises(ScopeError, match=r"model\.layers\.0\.mlp\.gate_proj, model\.layers\.0\.mlp\.up_proj, .* and "
                                         r"1 more that the forward never passes"):
        linearized_forward(params0, delta, CONFIG, scope, batch["input_ids"], batch["attention_mask"])


def test_the_check_runs_once_per_compilation_not_per_step(monkeypatch):
    calls = []
    real = linearize.check_reached
    monkeypatch.setattr(linearize, "check_reached", lambda *a: calls.append(a[0].name) or real(*a))
    params0, batch, scope = _params(CONFIG), _batch(), resolve_scope(CONFIG, "attn_ffn")
    optimizer = optax.sgd(0.1)
    step = make_train_step(CONFIG, scope, optimizer)
    delta = zero_delta(params0, scope)
    state = init_opt_state(optimizer, delta)
    delta, state, _ = step(params0, delta, state, batch)
    traced = list(calls)
    for _ in range(2):
        delta, state, _ = step(params0, delta, state, batch)
    assert calls == traced and set(traced) == {"attn_ffn"}


# Every scope on the architecture with every kind of tensor (biases on all projections); on the others, the
# per-unit scope holding every projection, and `all` (every tensor: the tied head, windows, Qwen2's biases).
SCOPES = {architecture: ("attn_ffn", "all") for architecture in ARCHITECTURES} | {"llama-biases": tuple(UNITS)}


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_one_step_of_every_scope_moves_every_tensor_of_the_scope(architecture):
    """SGD from Δ = 0: Δ = −lr ∇L(θ0), and at θ0 the linearized model's gradient is the plain model's."""
    config, batch, lr = ARCHITECTURES[architecture], _batch(), 0.5
    params0 = _params(config)
    oracle = jax.jit(jax.grad(_oracle_loss), static_argnums=1)(params0, config, batch)
    for name in SCOPES[architecture]:
        scope = resolve_scope(config, name)
        optimizer = optax.sgd(lr)
        delta = zero_delta(params0, scope)
        delta, _, _ = make_train_step(config, scope, optimizer)(params0, delta, init_opt_state(optimizer, delta),
                                                                batch)
        assert set(delta) == set(scope.params), name
        for n in scope.params:
            expected = -lr * np.asarray(oracle[n])
            assert np.abs(expected).max() > 0, (name, n)  # the plain forward reaches the tensor
            step = np.asarray(delta[n])
            assert np.abs(step).max() > 0, (name, n)
            assert np.abs(step - expected).max() <= 1e-4 * np.abs(expected).max(), (name, n)
