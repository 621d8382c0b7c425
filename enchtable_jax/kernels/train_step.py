"""One optimizer step on the scope's tensors, through the linearized (or the plain) forward.

Batches are dicts of [B, T] arrays: `input_ids`, `attention_mask` (1 = token) and `loss_mask`
(1 where the token is a training target, i.e. response tokens). The loss is the mean next-token
cross-entropy over target tokens, in float32.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from enchtable_jax.kernels.linearize import linearized_forward, scope_forward
from enchtable_jax.kernels.mesh import batch_sharding, put_tree, tree_shardings
from enchtable_jax.kernels.scopes import Scope
from enchtable_jax.models.config import ModelConfig
from enchtable_jax.models.transformer import Params

Batch = Mapping[str, jax.Array]
Step = Callable[[Params, Params, optax.OptState, Batch], tuple[Params, optax.OptState, dict[str, jax.Array]]]


def token_cross_entropy(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of next-token NLL over target tokens, number of target tokens); token t is predicted at t-1."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.promote_types(logits.dtype, jnp.float32)), axis=-1)
    nll = -jnp.take_along_axis(logp, input_ids[:, 1:, None], axis=-1)[..., 0]
    weight = loss_mask[:, 1:].astype(logp.dtype)
    return jnp.sum(nll * weight), jnp.sum(weight)


def scope_logits(delta: Params, params0: Params, config: ModelConfig, scope: Scope, batch: Batch,
                 linearized: bool = True) -> jax.Array:
    """Logits with the scope's tensors displaced by Δ: through the linearization, or the plain model
    at θ0 + Δ. θ0 sets the compute dtype; Δ may be float32 master values."""
    if linearized:
        return linearized_forward(params0, delta, config, scope, batch["input_ids"], batch["attention_mask"])
    moved = {n: (params0[n].astype(d.dtype) + d).astype(params0[n].dtype) for n, d in delta.items()}
    return scope_forward({**params0, **moved}, config, scope, batch["input_ids"], batch["attention_mask"])


def loss_sums(delta: Params, params0: Params, config: ModelConfig, scope: Scope, batch: Batch,
              linearized: bool = True) -> tuple[jax.Array, jax.Array]:
    """(summed next-token NLL over target tokens, number of target tokens) of one micro-batch."""
    return token_cross_entropy(scope_logits(delta, params0, config, scope, batch, linearized),
                               batch["input_ids"], batch["loss_mask"])


def loss_fn(delta: Params, params0: Params, config: ModelConfig, scope: Scope, batch: Batch,
            linearized: bool = True) -> jax.Array:
    """Mean next-token cross-entropy over the batch's target tokens."""
    total, count = loss_sums(delta, params0, config, scope, batch, linearized)
    return total / jnp.maximum(count, 1.0)


def delta_itself(trained: Params) -> Params:
    """The trained variables are Δ itself (dense training)."""
    return trained


def gradients(params0: Params, trained, batch: Batch, config: ModelConfig, scope: Scope, linearized: bool = True,
              delta_of: Callable[[Params], Params] = delta_itself) -> tuple[Params, jax.Array, jax.Array]:
    """(gradient of the summed target NLL wrt the trained variables, summed NLL, target tokens) over [A, B, T]
    micro-batches, Δ = delta_of(trained).

    Δ's gradient G is accumulated over the micro-batches (a scan, so memory stays at one micro-batch) and pulled
    back through `delta_of` once: for factors Δ = s·B·A that is the chain rule s·G Aᵀ, s·Bᵀ G.
    """
    delta, pullback = jax.vjp(delta_of, trained)

    def accumulate(carry, micro):
        (total, count), grads = jax.value_and_grad(loss_sums, has_aux=True)(delta, params0, config, scope, micro,
                                                                            linearized)
        sums, total_acc, count_acc = carry
        return (jax.tree.map(jnp.add, sums, grads), total_acc + total, count_acc + count), None

    zeros = jax.tree.map(jnp.zeros_like, delta)
    (sums, total, count), _ = jax.lax.scan(accumulate, (zeros, 0.0, 0.0), batch)
    (grads,) = pullback(sums)
    return grads, total, count


def make_train_step(config: ModelConfig, scope: Scope, optimizer: optax.GradientTransformation,
                    linearized: bool = True, mesh: Mesh | None = None,
                    delta_of: Callable[[Params], Params] = delta_itself) -> Step:
    """A jit-compiled step(params0, trained, opt_state, batch) -> (trained, opt_state, metrics); the trained
    variables are Δ = θ − θ0, or what `delta_of` maps to Δ (e.g. low-rank factors, `kernels.low_rank_delta`).

    A batch of [B, T] arrays is one micro-batch; [A, B, T] arrays are A micro-batches whose gradients
    are accumulated (`gradients`) before one optimizer update. The loss is the mean over all target tokens
    of the step, so it does not depend on how the examples are split into micro-batches or devices. The
    trained variables and `opt_state` are donated (AdamW's weight decay, if any, pulls them towards 0: θ towards
    θ0). With a `mesh` (see `kernels.mesh.make_mesh`) examples are split over all devices and every array sharded
    by `param_sharding` (over 'fsdp' when that axis is > 1).
    """

    def step(params0, trained, opt_state, batch):
        sums, total, count = gradients(params0, trained, batch, config, scope, linearized, delta_of)
        count = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / count, sums)
        updates, opt_state = optimizer.update(grads, opt_state, trained)
        metrics = {"loss": total / count, "grad_norm": optax.tree.norm(grads), "target_tokens": count}
        return optax.apply_updates(trained, updates), opt_state, metrics

    def with_accumulation_axis(batch):
        return {k: v[None] if jnp.ndim(v) == 2 else v for k, v in batch.items()}

    if mesh is None:
        jitted = jax.jit(step, donate_argnums=(1, 2))
        return lambda params0, trained, opt_state, batch: jitted(params0, trained, opt_state,
                                                                 with_accumulation_axis(batch))
    compiled: dict[str, Callable] = {}

    def sharded_step(params0, trained, opt_state, batch):
        batch = with_accumulation_axis(batch)
        shardings = (tree_shardings(params0, mesh), tree_shardings(trained, mesh), tree_shardings(opt_state, mesh),
                     jax.tree.map(lambda _: batch_sharding(mesh, accumulation_axis=True), batch))
        if "step" not in compiled:  # shardings depend only on shapes, fixed for a run
            compiled["step"] = jax.jit(step, in_shardings=shardings, out_shardings=(*shardings[1:3], None),
                                       donate_argnums=(1, 2))
        return compiled["step"](*put_tree((params0, trained, opt_state, batch), shardings))

    return sharded_step


def init_opt_state(optimizer: optax.GradientTransformation, trained: Params) -> optax.OptState:
    """Optimizer state laid out like the trained variables (jit propagates their shardings)."""
    return jax.jit(optimizer.init)(trained)
