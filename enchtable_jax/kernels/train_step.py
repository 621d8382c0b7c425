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

from enchtable_jax.kernels.linearize import linearized_forward
from enchtable_jax.kernels.mesh import batch_sharding, tree_shardings
from enchtable_jax.kernels.scopes import Scope
from enchtable_jax.models.config import ModelConfig
from enchtable_jax.models.transformer import Params, forward

Batch = Mapping[str, jax.Array]
Step = Callable[[Params, Params, optax.OptState, Batch], tuple[Params, optax.OptState, dict[str, jax.Array]]]


def token_cross_entropy(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of next-token NLL over target tokens, number of target tokens); token t is predicted at t-1."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.promote_types(logits.dtype, jnp.float32)), axis=-1)
    nll = -jnp.take_along_axis(logp, input_ids[:, 1:, None], axis=-1)[..., 0]
    weight = loss_mask[:, 1:].astype(logp.dtype)
    return jnp.sum(nll * weight), jnp.sum(weight)


def scope_logits(params: Params, params0: Params, config: ModelConfig, scope: Scope, batch: Batch,
                 linearized: bool = True) -> jax.Array:
    """Logits with the scope's tensors at `params`: through the linearization, or the plain model."""
    if linearized:
        return linearized_forward(params0, params, config, scope, batch["input_ids"], batch["attention_mask"])
    return forward({**params0, **params}, config, batch["input_ids"], batch["attention_mask"])


def loss_fn(params: Params, params0: Params, config: ModelConfig, scope: Scope, batch: Batch,
            linearized: bool = True) -> jax.Array:
    """Mean next-token cross-entropy over the batch's target tokens."""
    total, count = token_cross_entropy(scope_logits(params, params0, config, scope, batch, linearized),
                                       batch["input_ids"], batch["loss_mask"])
    return total / jnp.maximum(count, 1.0)


def make_train_step(config: ModelConfig, scope: Scope, optimizer: optax.GradientTransformation,
                    linearized: bool = True, mesh: Mesh | None = None) -> Step:
    """A jit-compiled step(params0, params, opt_state, batch) -> (params, opt_state, metrics).

    `params` and `opt_state` are donated. With a `mesh` (see `kernels.mesh.make_mesh`) the batch is split
    over all devices and every array sharded by `param_sharding` (over 'fsdp' when that axis is > 1).
    """

    def step(params0, params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, params0, config, scope, batch, linearized)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, {"loss": loss, "grad_norm": optax.global_norm(grads)}

    if mesh is None:
        return jax.jit(step, donate_argnums=(1, 2))
    compiled: dict[str, Callable] = {}

    def sharded_step(params0, params, opt_state, batch):
        shardings = (tree_shardings(params0, mesh), tree_shardings(params, mesh), tree_shardings(opt_state, mesh),
                     jax.tree.map(lambda _: batch_sharding(mesh), batch))
        if "step" not in compiled:  # shardings depend only on shapes, fixed for a run
            compiled["step"] = jax.jit(step, in_shardings=shardings, out_shardings=(*shardings[1:3], None),
                                       donate_argnums=(1, 2))
        return compiled["step"](*jax.device_put((params0, params, opt_state, batch), shardings))

    return sharded_step


def init_opt_state(optimizer: optax.GradientTransformation, params: Params) -> optax.OptState:
    """Optimizer state laid out like `params` (jit propagates their shardings)."""
    return jax.jit(optimizer.init)(params)
