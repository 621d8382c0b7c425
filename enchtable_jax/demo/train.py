"""Plain full fine-tuning for the demo's models (every tensor, embeddings included): jit, optax AdamW.

The base, aligned and task models are made with it. Examples come from `distillation.data.render` (the
chat template, loss on the assistant's tokens), padded to one fixed width so that the step compiles
once for all three stages. The learning rate and weight decay enter the step as arguments (AdamW written
as Adam scaling plus decoupled decay), so one compiled step serves every stage and schedule.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from enchtable_jax.distillation.data import Example, collate
from enchtable_jax.kernels.train_step import token_cross_entropy
from enchtable_jax.models.config import ModelConfig
from enchtable_jax.models.transformer import Params, forward


@dataclasses.dataclass(frozen=True)
class TrainOptions:
    """One stage's schedule: AdamW at `lr` with linear warm-up then cosine decay to 10%."""

    steps: int
    lr: float = 3e-3
    batch_size: int = 32
    warmup: int = 20
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0


def _adam(max_grad_norm: float) -> optax.GradientTransformation:
    """Clipping and Adam's moment scaling; the step applies lr and the decoupled weight decay (= optax.adamw)."""
    return optax.chain(optax.clip_by_global_norm(max_grad_norm), optax.scale_by_adam())


def learning_rate(step: int, options: TrainOptions) -> float:
    """Warm-up to `lr` over `warmup` steps, then cosine decay to lr/10 at the last step."""
    if step < options.warmup:
        return options.lr * (step + 1) / options.warmup
    progress = (step - options.warmup) / max(1, options.steps - options.warmup)
    return options.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


@functools.partial(jax.jit, static_argnames=("config", "max_grad_norm"), donate_argnums=(0, 1))
def _step(params: Params, opt_state: optax.OptState, batch: dict[str, jax.Array], lr: jax.Array,
          weight_decay: jax.Array, config: ModelConfig, max_grad_norm: float):
    def loss(p):
        total, count = token_cross_entropy(forward(p, config, batch["input_ids"], batch["attention_mask"]),
                                           batch["input_ids"], batch["loss_mask"])
        return total / jnp.maximum(count, 1.0)

    value, grads = jax.value_and_grad(loss)(params)
    direction, opt_state = _adam(max_grad_norm).update(grads, opt_state, params)
    params = jax.tree.map(lambda p, d: p - lr * (d + weight_decay * p), params, direction)
    return params, opt_state, value


def fine_tune(params: Params, config: ModelConfig, examples: Sequence[Example], options: TrainOptions, width: int,
              pad_id: int, seed: int, on_step: Callable[[int, jax.Array], None] | None = None) -> tuple[Params, list[float]]:
    """Train all of `params` on `examples` for `options.steps` steps; returns (params, losses).

    Batches are drawn by a seeded shuffle, epoch after epoch, each padded to `width` tokens.
    `on_step(step, loss)` gets the loss as a device array (reading it waits for the step).
    """
    params = {n: jnp.array(v, jnp.float32) for n, v in params.items()}  # a copy: the step donates its input
    opt_state = _adam(options.max_grad_norm).init(params)
    rng = np.random.default_rng([seed, 11])
    order: list[int] = []
    losses = []
    for step in range(options.steps):
        if len(order) < options.batch_size:
            order += rng.permutation(len(examples)).tolist()
        indices, order = order[:options.batch_size], order[options.batch_size:]
        batch = collate(examples, indices, pad_id, multiple=width, max_length=width)
        params, opt_state, loss = _step(params, opt_state, batch, jnp.float32(learning_rate(step, options)),
                                        jnp.float32(options.weight_decay), config, options.max_grad_norm)
        losses.append(loss)
        if on_step is not None:
            on_step(step + 1, loss)
    return params, [float(v) for v in losses]
