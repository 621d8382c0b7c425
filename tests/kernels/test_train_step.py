"""Training through the linearized forward: loss formula, gradients vs finite differences, donation,
and the same step on a mesh of 8 simulated CPU devices as on one."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from enchtable_jax.kernels.linearize import zero_delta
from enchtable_jax.kernels.mesh import make_mesh, shard_tree
from enchtable_jax.kernels.scopes import resolve_scope
from enchtable_jax.kernels.train_step import init_opt_state, loss_fn, make_train_step, token_cross_entropy
from enchtable_jax.models.model import Model
from enchtable_jax.models import init_params, preset_config

CONFIG = preset_config("tiny", "llama", num_hidden_layers=2, vocab_size=64, hidden_size=32, intermediate_size=48)


def _batch(n=8, t=10, seed=1):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, CONFIG.vocab_size, (n, t)).astype(np.int32)
    mask = np.ones((n, t), np.int32)
    mask[1, 7:] = 0
    mask[3, 5:] = 0
    loss_mask = mask.copy()
    loss_mask[:, :4] = 0  # the "prompt": not a target
    return {"input_ids": ids, "attention_mask": mask, "loss_mask": loss_mask}


def test_token_cross_entropy_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 6, 11)).astype(np.float32)
    ids = rng.integers(0, 11, (3, 6))
    mask = rng.integers(0, 2, (3, 6))
    total, count = token_cross_entropy(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(mask))
    x = logits.astype(np.float64)[:, :-1]
    logp = x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(-1, keepdims=True)
    nll = -np.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]
    assert count == mask[:, 1:].sum()
    np.testing.assert_allclose(total, (nll * mask[:, 1:]).sum(), rtol=1e-5)


# ffn (8 s), attn_block (9.5 s) and model (9 s) are slow: `all` holds every tensor of theirs and is checked in the
# default suite
@pytest.mark.parametrize("scope_name", [pytest.param("ffn", marks=pytest.mark.slow),
                                        pytest.param("attn_block", marks=pytest.mark.slow),
                                        pytest.param("model", marks=pytest.mark.slow), "all"])
def test_gradient_matches_finite_differences(scope_name):
    scope = resolve_scope(CONFIG, scope_name)
    batch = {k: jnp.asarray(v) for k, v in _batch(4).items()}
    with jax.enable_x64(True):
        params0 = init_params(CONFIG, seed=0, dtype=jnp.float64, std=0.1)
        rng = np.random.default_rng(5)
        theta = {n: 0.05 * rng.normal(size=params0[n].shape) for n in scope.params}  # Δ = θ − θ0
        direction = {n: rng.normal(size=params0[n].shape) for n in scope.params}
        loss = lambda p: loss_fn(p, params0, CONFIG, scope, batch)  # noqa: E731
        grad = jax.grad(loss)(theta)
        eps = 1e-5
        shift = lambda s: {n: theta[n] + s * eps * direction[n] for n in theta}  # noqa: E731
        numeric = (loss(shift(1)) - loss(shift(-1))) / (2 * eps)
        analytic = sum(jnp.vdot(grad[n], direction[n]) for n in theta)
    assert abs(float(analytic) - float(numeric)) <= 1e-6 * max(1.0, abs(float(numeric)))


def test_steps_lower_the_loss_and_donate_buffers():
    model0 = Model(CONFIG, init_params(CONFIG, seed=0))
    scope = resolve_scope(CONFIG, "ffn")
    optimizer = optax.adamw(3e-3)
    params = zero_delta(model0.params, scope)
    opt_state = init_opt_state(optimizer, params)
    step = make_train_step(CONFIG, scope, optimizer)
    batch = _batch()
    first = params
    losses = []
    for _ in range(5):
        params, opt_state, metrics = step(model0.params, params, opt_state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(first))  # donated, not copied
    assert not model0.params["model.layers.0.mlp.up_proj.weight"].is_deleted()  # θ0 untouched
    assert set(params) == set(scope.params)


@pytest.mark.parametrize("fsdp", [1, 2])
@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
def test_mesh_of_8_devices_matches_one_device(fsdp, optimizer_name):
    assert len(jax.devices()) == 8, "tests/conftest.py requests 8 CPU devices"
    model0 = Model(CONFIG, init_params(CONFIG, seed=0))
    scope = resolve_scope(CONFIG, "attn_block+ffn")
    optimizer = optax.sgd(0.5) if optimizer_name == "sgd" else optax.adamw(1e-3)
    batch = _batch()
    results = []
    for mesh in (None, make_mesh(fsdp)):
        params, params0 = zero_delta(model0.params, scope), model0.params
        if mesh is not None:
            params, params0 = shard_tree(params, mesh), shard_tree(params0, mesh)
        opt_state = init_opt_state(optimizer, params)
        step = make_train_step(CONFIG, scope, optimizer, mesh=mesh)
        losses = []
        for _ in range(2):
            params, opt_state, metrics = step(params0, params, opt_state, batch)
            losses.append(float(metrics["loss"]))
        results.append((losses, {n: np.asarray(v) for n, v in params.items()}, params))
    (losses1, p1, _), (losses8, p8, placed) = results
    np.testing.assert_allclose(losses8, losses1, rtol=1e-5)
    for n in p1:
        update1, update8 = p1[n], p8[n]  # Δ starts at zero: it is the update
        # Adam divides by sqrt(v): entries with near-zero gradients amplify reduction-order rounding
        tolerance = 1e-4 if optimizer_name == "sgd" else 1e-3
        assert np.abs(update8 - update1).max() <= tolerance * np.abs(update1).max(), n
    sharded = placed["model.layers.0.mlp.up_proj.weight"].sharding
    assert len(sharded.device_set) == 8
    if fsdp == 2:
        assert sharded.spec[0] == "fsdp"  # parameters really split over the fsdp axis


def test_accumulated_micro_batches_equal_one_big_batch():
    model0 = Model(CONFIG, init_params(CONFIG, seed=0))
    scope = resolve_scope(CONFIG, "ffn")
    optimizer = optax.sgd(0.5)
    batch = _batch(8)
    results = []
    for split in (batch, {k: v.reshape(2, 4, -1) for k, v in batch.items()}):  # [8, T] vs [2 micro, 4, T]
        params = zero_delta(model0.params, scope)
        step = make_train_step(CONFIG, scope, optimizer)
        params, _, metrics = step(model0.params, params, init_opt_state(optimizer, params), split)
        results.append((float(metrics["loss"]), params))
    (loss1, p1), (loss2, p2) = results
    assert loss2 == pytest.approx(loss1, rel=1e-6)
    chex.assert_trees_all_close(p2, p1, rtol=1e-5, atol=1e-7)


def test_bfloat16_model_keeps_float32_updates_below_its_resolution():
    """θ0 in bf16, Δ in float32 (zero_delta's default): a step 10⁴ times smaller than the one before is kept in Δ,
    where a bf16 Δ, or a bf16 θ, would round it away."""
    params0 = {n: v.astype(jnp.bfloat16) for n, v in init_params(CONFIG, seed=0, std=0.1).items()}
    scope = resolve_scope(CONFIG, "ffn")
    optimizer = optax.sgd(lambda count: jnp.where(count == 0, 1.0, 1e-4))
    step = make_train_step(CONFIG, scope, optimizer)
    delta = zero_delta(params0, scope)
    delta, state, _ = step(params0, delta, init_opt_state(optimizer, delta), _batch(4))
    first = {n: np.asarray(v) for n, v in delta.items()}  # copied: the next step donates Δ
    second = {n: np.asarray(v) for n, v in step(params0, delta, state, _batch(4))[0].items()}
    for n in scope.params:
        small = second[n].astype(np.float64) - first[n]
        assert np.mean(small != 0) > 0.9 and second[n].dtype == np.float32, n  # the small step is in Δ
        assert np.abs(small).max() < 1e-3 * np.abs(first[n]).max(), n
        as_bf16 = (first[n] + small).astype(jnp.bfloat16) == first[n].astype(jnp.bfloat16)
        assert np.mean(as_bf16) > 0.5, n  # ...which bf16 storage of Δ would lose
        theta = (params0[n].astype(np.float32) + second[n]).astype(jnp.bfloat16)
        assert np.mean(theta == (params0[n].astype(np.float32) + first[n]).astype(jnp.bfloat16)) > 0.5, n  # or of θ
