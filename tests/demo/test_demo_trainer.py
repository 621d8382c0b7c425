"""The demo's trainer: one step equals optax's AdamW (the oracle), the schedule's end points, determinism."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from enchtable_jax.demo import world as w
from enchtable_jax.demo.train import (
    TrainOptions,
    _adam,
    _step,
    fine_tune,
    learning_rate,
)
from enchtable_jax.distillation.data import collate, render
from enchtable_jax.kernels.train_step import token_cross_entropy
from enchtable_jax.models.init import init_params, preset_config
from enchtable_jax.models.transformer import forward

WIDTH = 32


@pytest.fixture(scope="module")
def setup():
    tokenizer = w.word_tokenizer()
    pairs = w.make_world(0, w.Sizes(base=16, aligned=1, task=1, harmful=1)).base
    examples, _ = render([[{"role": "user", "content": p.prompt}, {"role": "assistant", "content": p.answer}]
                          for p in pairs], tokenizer, WIDTH)
    config = preset_config("tiny", "llama", vocab_size=-(-len(tokenizer) // 8) * 8, hidden_size=32,
                           intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
    return config, examples, tokenizer.pad_token_id


def test_one_step_is_optax_adamw(setup):
    config, examples, pad = setup
    params = init_params(config, seed=1)
    batch = collate(examples, list(range(8)), pad, multiple=WIDTH, max_length=WIDTH)
    lr, wd = 1e-2, 0.1

    def loss(p):
        total, count = token_cross_entropy(forward(p, config, batch["input_ids"], batch["attention_mask"]),
                                           batch["input_ids"], batch["loss_mask"])
        return total / count

    oracle = optax.chain(optax.clip_by_global_norm(0.5), optax.adamw(lr, weight_decay=wd))
    updates, _ = oracle.update(jax.grad(loss)(params), oracle.init(params), params)
    expected = optax.apply_updates(params, updates)
    copy = jax.tree.map(jnp.array, params)
    got, _, value = _step(copy, _adam(0.5).init(copy), batch, jnp.float32(lr), jnp.float32(wd), config, 0.5)
    assert float(value) == pytest.approx(float(loss(params)), rel=1e-5)
    for name in params:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-6, err_msg=name)  # Adam's first step ≈ lr·sign(g)


def test_schedule_warms_up_then_decays_to_a_tenth():
    options = TrainOptions(steps=100, lr=1.0, warmup=10)
    assert learning_rate(0, options) == pytest.approx(0.1)
    assert learning_rate(10, options) == pytest.approx(1.0)
    assert learning_rate(100, options) == pytest.approx(0.1)
    rates = [learning_rate(s, options) for s in range(10, 101)]
    assert all(a >= b for a, b in itertools.pairwise(rates))


def test_fine_tune_learns_and_repeats_itself(setup):
    config, examples, pad = setup
    options = TrainOptions(steps=30, lr=1e-2, batch_size=4, warmup=5)
    params = init_params(config, seed=2)
    first, losses = fine_tune(params, config, examples, options, WIDTH, pad, seed=3)
    again, losses_again = fine_tune(params, config, examples, options, WIDTH, pad, seed=3)
    assert losses == losses_again
    assert all(np.array_equal(first[n], again[n]) for n in first)
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])
    assert all(np.array_equal(params[n], init_params(config, seed=2)[n]) for n in params)  # input not donated
