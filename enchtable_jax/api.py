"""The public model API in one place: `Model` and `apply` (models/), `load`, `save`, `save_orbax` and
`describe` (converters/); the flax.nnx face: `load_nnx` (converters/), `from_nnx` and its `CausalLM` (models/)."""

from enchtable_jax.converters.model_io import describe, load, load_nnx, save, save_orbax
from enchtable_jax.models.model import Model, apply
from enchtable_jax.models.nnx import CausalLM, from_nnx

__all__ = ["CausalLM", "Model", "apply", "describe", "from_nnx", "load", "load_nnx", "save", "save_orbax"]
