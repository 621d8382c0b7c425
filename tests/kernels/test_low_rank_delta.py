"""Δ trained as scale·B·A: PEFT's initialisation, the factors' gradients against the chain rule of the dense
gradient (float64 oracle), and the rank check."""

import functools
import math

import jax
import numpy as np
import pytest
import torch

from enchtable_jax.errors import EnchtableError
from enchtable_jax.kernels.low_rank_delta import A, B, check_rank, dense_delta, init_factors
from enchtable_jax.kernels.scopes import resolve_scope
from enchtable_jax.kernels.train_step import gradients
from enchtable_jax.models import init_params, preset_config

CONFIG = preset_config("tiny", "llama", num_hidden_layers=1, vocab_size=64, hidden_size=32, intermediate_size=48)
PARAMS0 = init_params(CONFIG, seed=0)


def _batch(t=12, seed=1):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, CONFIG.vocab_size, (1, 2, t)).astype(np.int32)  # one micro-batch of 2 rows
    loss_mask = np.ones_like(ids)
    loss_mask[..., :3] = 0
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": loss_mask}


def test_init_is_peft_kaiming_uniform_a_and_zero_b():
    scope = resolve_scope(CONFIG, "attn_block+ffn")  # matrices and the norm vectors
    trained = init_factors(PARAMS0, scope, rank=4, seed=0)
    for name in scope.params:
        shape = PARAMS0[name].shape
        if len(shape) == 1:
            assert not np.asarray(trained[name]).any(), name
            continue
        a, b = np.asarray(trained[name][A]), np.asarray(trained[name][B])
        assert a.shape == (4, shape[1]) and b.shape == (shape[0], 4) and not b.any()
        reference = torch.nn.init.kaiming_uniform_(torch.empty(4096, shape[1]), a=math.sqrt(5)).numpy()
        bound = np.abs(reference).max()  # torch's (PEFT's) bound 1/sqrt(n), as sampled
        assert np.abs(a).max() <= 1 / math.sqrt(shape[1]) and np.abs(a).max() > 0.8 * bound, name
    assert not any(np.asarray(d).any() for d in dense_delta(trained, 0.5).values())  # Δ starts at 0


def test_factor_gradients_are_the_chain_rule_of_the_dense_gradient():
    scope = resolve_scope(CONFIG, "attn_block+ffn")
    scale, rng = 2.0, np.random.default_rng(3)
    trained = init_factors(PARAMS0, scope, rank=3, seed=0)
    trained = {n: {A: v[A], B: 0.05 * rng.standard_normal(v[B].shape).astype(np.float32)} if isinstance(v, dict)
               else 0.01 * rng.standard_normal(v.shape).astype(np.float32) for n, v in trained.items()}
    batch = _batch()
    grads = jax.jit(gradients, static_argnames=("config", "scope", "delta_of"))  # op by op takes 25 s
    factor_grads, total, _ = grads(PARAMS0, trained, batch, CONFIG, scope,
                                   delta_of=functools.partial(dense_delta, scale=scale))
    dense_grads, dense_total, _ = grads(PARAMS0, dense_delta(trained, scale), batch, CONFIG, scope)
    np.testing.assert_allclose(float(total), float(dense_total), rtol=1e-6)
    for name, v in trained.items():
        g = np.asarray(dense_grads[name], np.float64)
        if not isinstance(v, dict):
            np.testing.assert_allclose(np.asarray(factor_grads[name]), g, rtol=1e-5, atol=1e-7)
            continue
        a, b = np.asarray(v[A], np.float64), np.asarray(v[B], np.float64)
        for got, expected in ((factor_grads[name][B], scale * g @ a.T), (factor_grads[name][A], scale * b.T @ g)):
            np.testing.assert_allclose(np.asarray(got, np.float64), expected,
                                       atol=1e-5 * np.abs(expected).max(), err_msg=name)


@pytest.mark.parametrize("rank", [0, -1, 33])
def test_a_rank_outside_1_to_min_dimension_names_the_option(rank):
    scope = resolve_scope(CONFIG, "ffn")  # 32 x 48 and 48 x 32 matrices: ranks 1..32
    check_rank(PARAMS0, scope, 32)
    with pytest.raises(EnchtableError, match=r"--lora-rank\) must be an integer in \[1, 32\] .*got " + str(rank)):
        check_rank(PARAMS0, scope, rank)
