"""The public model API in one place: `Model` and `apply` (models/), `load`, `save`, `save_orbax` and
`describe` (converters/)."""

from enchtable_jax.converters.model_io import describe, load, save, save_orbax
from enchtable_jax.models.model import Model, apply

__all__ = ["Model", "apply", "describe", "load", "save", "save_orbax"]
