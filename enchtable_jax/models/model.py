"""`Model`, the type every stage passes around, and its jit-compiled forward pass.

`Model` is a pytree (params are its leaves, config and source are static), so it passes through
`jax.jit`, `jax.tree.map` and sharding utilities as it is.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from enchtable_jax.models.config import ModelConfig
from enchtable_jax.models.transformer import forward

if TYPE_CHECKING:
    from enchtable_jax.models.nnx import CausalLM


@functools.partial(jax.tree_util.register_dataclass, data_fields=["params"], meta_fields=["config", "source"])
@dataclasses.dataclass(frozen=True)
class Model:
    """A causal LM: its resolved config and a flat dict of HF-named parameters in HF (out, in) layout.

    `source` is the folder it was loaded from (its tokenizer files are copied when saving), or None.
    """

    config: ModelConfig
    params: dict[str, jax.Array]
    source: Path | None = None

    def to_nnx(self) -> CausalLM:
        """This model as a flax.nnx `CausalLM` over the same arrays (models/nnx.py; `from_nnx` converts back)."""
        from enchtable_jax.models.nnx import to_nnx  # not at the top: models/nnx.py imports this module

        return to_nnx(self)


@functools.partial(jax.jit, static_argnames="config")
def _forward(params, config, input_ids, attention_mask):
    return forward(params, config, input_ids, attention_mask)


def apply(model: Model, input_ids, attention_mask=None) -> jax.Array:
    """Logits [B, T, vocab] for token ids [B, T] (jit-compiled; 1 = token, 0 = padding in `attention_mask`)."""
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, tokens], got shape {input_ids.shape}")
    if attention_mask is None:
        attention_mask = jnp.ones_like(input_ids)
    attention_mask = jnp.asarray(attention_mask, jnp.int32)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {attention_mask.shape} differs from input_ids {input_ids.shape}")
    return _forward(model.params, model.config, input_ids, attention_mask)
