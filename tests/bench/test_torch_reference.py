"""The PyTorch reference of the bench against our JAX forward, linearized forward and AdamW step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from enchtable_jax.models.model import Model, apply
from enchtable_jax.bench.optional import reference_module
from enchtable_jax.kernels.linearize import linearized_forward, zero_delta
from enchtable_jax.kernels.scopes import resolve_scope
from enchtable_jax.kernels.train_step import loss_fn, make_train_step
from enchtable_jax.models import init_params, preset_config, transformer
from enchtable_jax.models.transformer import rope_inv_freq

torch_reference, _why = reference_module("torch_reference")  # benchmarks/torch_reference.py
assert torch_reference is not None, _why
make_torch_train_step, to_torch = torch_reference.make_torch_train_step, torch_reference.to_torch
torch_forward, torch_linearized_forward = torch_reference.torch_forward, torch_reference.torch_linearized_forward

# torch.func.jvp's first call jit-scripts torch's jvp decompositions (torch-internal, once per process).
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
SHAPE = dict(num_hidden_layers=2, vocab_size=64, hidden_size=32, intermediate_size=48)
CONFIGS = {
    "qwen2": preset_config("tiny", "qwen2", **SHAPE),  # q/k/v biases, untied head
    "llama": preset_config("tiny", "llama", tie_word_embeddings=True, **SHAPE),  # no window, tied head
}
WINDOWED = preset_config("tiny", "mistral", sliding_window=3, **SHAPE)  # forward only: sliding windows


def _setup(config, seed=0):
    """Random θ0 with norms and biases perturbed (so they matter), and a batch with a right- and a left-padded row."""
    params = init_params(config, seed=seed, std=0.1)
    rng = np.random.default_rng(seed + 1)
    params = {n: v + 0.1 * rng.normal(size=v.shape).astype(np.float32) if "norm" in n or "bias" in n else v
              for n, v in params.items()}
    ids = rng.integers(0, config.vocab_size, (3, 9)).astype(np.int32)
    mask = np.ones((3, 9), np.int32)
    mask[1, 6:] = 0
    mask[2, :3] = 0
    loss_mask = mask.copy()
    loss_mask[:, :3] = 0
    return params, {"input_ids": ids, "attention_mask": mask, "loss_mask": loss_mask}


def _delta(params0, scope, seed=7, scale=0.05):
    rng = np.random.default_rng(seed)
    return {n: scale * rng.normal(size=params0[n].shape).astype(np.float32) for n in scope.params}


def _rel(a, b, real):
    a, b = np.asarray(a)[real], np.asarray(b)[real]
    return np.abs(a - b).max() / np.abs(b).max()


@pytest.mark.parametrize("config", [*CONFIGS.values(), WINDOWED], ids=[*CONFIGS, "mistral-window"])
def test_forward_matches_jax(config):
    params, batch = _setup(config)
    ours = apply(Model(config, params), batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        theirs = torch_forward(to_torch(params), config, batch["input_ids"], batch["attention_mask"]).numpy()
    assert _rel(theirs, ours, batch["attention_mask"].astype(bool)) <= 1e-5


@pytest.mark.parametrize("family", CONFIGS)
@pytest.mark.parametrize("scope_name", ["ffn", "attn_block", "model"])
def test_linearized_forward_matches_jax(family, scope_name):
    config = CONFIGS[family]
    scope = resolve_scope(config, scope_name)
    params0, batch = _setup(config)
    delta = _delta(params0, scope)
    ours = linearized_forward(params0, {n: jnp.asarray(v) for n, v in delta.items()}, config, scope,
                              jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]))
    with torch.no_grad():
        theirs = torch_linearized_forward(to_torch(params0), to_torch(delta), config, scope, batch["input_ids"],
                                          batch["attention_mask"]).numpy()
    assert _rel(theirs, ours, batch["attention_mask"].astype(bool)) <= 1e-5


def _rope_tables_float64_jax(positions, config, dtype):
    inv_freq = jnp.asarray(rope_inv_freq(config.head_dim, config.rope_theta, config.rope), jnp.float64)
    emb = jnp.concatenate([positions[..., None] * inv_freq] * 2, axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def _rope_tables_float64_torch(positions, config, dtype):
    inv_freq = torch.from_numpy(rope_inv_freq(config.head_dim, config.rope_theta, config.rope)).double()
    emb = torch.cat([positions.double()[..., None] * inv_freq] * 2, dim=-1)
    return torch.cos(emb).to(dtype), torch.sin(emb).to(dtype)


@pytest.mark.parametrize("scope_name", ["attn_block", "model"])  # per-unit jvps (inputs depend on θ), one global
def test_gradient_through_jvp_matches_jax_float64(scope_name, monkeypatch):
    """Autograd through torch.func.jvp gives JAX's gradient of the linearized loss, in float64 to 1e-10.

    Both sides take their RoPE tables in float64 here: the float32 tables of the real forward differ by
    an ulp between XLA's and torch's cos/sin, which alone moves float64 gradients by ~1e-8.
    """
    monkeypatch.setattr(transformer, "rope_tables", _rope_tables_float64_jax)
    monkeypatch.setattr(torch_reference, "rope_tables", _rope_tables_float64_torch)
    config = CONFIGS["qwen2"]
    scope = resolve_scope(config, scope_name)
    params0, batch = _setup(config)
    delta = _delta(params0, scope)
    with jax.enable_x64(True):
        p0 = {n: jnp.asarray(v, jnp.float64) for n, v in params0.items()}
        th = {n: jnp.asarray(v, jnp.float64) for n, v in delta.items()}
        grad = jax.jit(jax.grad(loss_fn), static_argnums=(2, 3))(th, p0, config, scope,
                                                                 {k: jnp.asarray(v) for k, v in batch.items()})
        ours = {n: np.asarray(v) for n, v in grad.items()}
    step = make_torch_train_step(config, scope, to_torch(params0, torch.float64))
    with torch.no_grad():
        for n, v in to_torch(delta, torch.float64).items():
            step.delta[n].copy_(v)
    step.loss(batch).backward()
    for n in scope.params:
        theirs = step.delta[n].grad.numpy()
        assert np.abs(theirs - ours[n]).max() <= 1e-10 * np.abs(ours[n]).max(), n


@pytest.mark.parametrize("family,scope_name", [("qwen2", "ffn"), ("llama", "attn_block"), ("qwen2", "model")])
def test_adamw_step_matches_optax(family, scope_name):
    config = CONFIGS[family]
    scope = resolve_scope(config, scope_name)
    params0, batch = _setup(config)
    hyper = dict(learning_rate=1e-3, b1=0.9, b2=0.99, eps=1e-6, weight_decay=0.05)
    optimizer = optax.adamw(**hyper)
    jax_delta = zero_delta(params0, scope)
    step = make_train_step(config, scope, optimizer)
    opt_state = optimizer.init(jax_delta)
    torch_step = make_torch_train_step(config, scope, params0, lr=hyper["learning_rate"],
                                       betas=(hyper["b1"], hyper["b2"]), eps=hyper["eps"],
                                       weight_decay=hyper["weight_decay"])
    jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
    for _ in range(2):  # the second step uses the optimizer state and a nonzero tangent Δ
        jax_delta, opt_state, metrics = step(params0, jax_delta, opt_state, jbatch)
        torch_loss = torch_step.step(batch)
        assert abs(torch_loss - float(metrics["loss"])) <= 1e-5 * abs(float(metrics["loss"]))
    theirs = torch_step.numpy_delta()
    for n in scope.params:
        update = np.asarray(jax_delta[n])
        assert np.abs(theirs[n] - update).max() <= 1e-3 * np.abs(update).max(), n
