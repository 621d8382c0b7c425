"""A flax.nnx face over a `Model`: the same arrays as `nnx.Param`s under their HF names, the same forward.

The flat HF-named dict stays the form every stage computes on (DESIGN.md says why); `CausalLM` wraps its
arrays without copying them, so Flax code can hold, shard and train a checkpoint as an `nnx.Module`, and
`from_nnx` hands the arrays back as a `Model` (for `save`, `merge`, ...) without copying them either.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import jax
from flax import nnx

from enchtable_jax.models.config import ModelConfig
from enchtable_jax.models.model import Model, apply
from enchtable_jax.models.tensors import logical_axes


class CausalLM(nnx.Module):
    """A causal LM of the Llama, Mistral or Qwen2 family (`config.model_type`; they share one forward).

    `params[name]` is the `nnx.Param` holding the HF tensor `name` in HF (out, in) layout. Its `out_sharding`
    metadata is the tensor's logical axis names from the tensor table (vocab, hidden, ffn, q, kv), so
    `nnx.get_partition_spec(nnx.state(module))` gives one PartitionSpec per tensor, and under
    `nnx.logical_axis_rules` (logical name -> mesh axis) one that `nnx.get_named_sharding` places on a mesh.
    Tensors the table does not declare (a tied checkpoint's `lm_head.weight`) are replicated.
    """

    def __init__(self, config: ModelConfig, params: Mapping[str, jax.Array], source: Path | None = None):
        axes = logical_axes(config)
        self.config = config
        self.source = source
        # eager_sharding=False: the arrays are already where `load` put them; the names only describe them.
        self.params = nnx.Dict({name: nnx.Param(value, eager_sharding=False,
                                                **({"out_sharding": axes[name]} if name in axes else {}))
                                for name, value in params.items()})

    def __call__(self, input_ids, attention_mask=None) -> jax.Array:
        """Logits [B, T, vocab] for token ids [B, T]: `apply` on the Params' current values."""
        return apply(from_nnx(self), input_ids, attention_mask)


def to_nnx(model: Model) -> CausalLM:
    """`model` as a `CausalLM` whose Params hold `model.params`' arrays (not copies)."""
    return CausalLM(model.config, model.params, model.source)


def from_nnx(module: CausalLM) -> Model:
    """The `Model` of a `CausalLM`'s current Param values (the arrays themselves, not copies)."""
    if not isinstance(module, CausalLM):
        raise TypeError(f"from_nnx expects an enchtable_jax CausalLM (from load_nnx or Model.to_nnx), "
                        f"got {type(module).__name__}")
    return Model(module.config, {name: param.get_value() for name, param in module.params.items()}, module.source)
