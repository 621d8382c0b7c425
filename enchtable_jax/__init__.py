"""enchtable-jax: EnchTable safety-alignment transfer in JAX.

Python API (what the CLI calls): `load`, `save`, `save_orbax`, `apply`, `describe`, and `Model`.
"""

from enchtable_jax.api import Model, apply, describe, load, save, save_orbax
from enchtable_jax.converters.orbax_io import is_orbax_checkpoint
from enchtable_jax.models.config import ModelConfig

__version__ = "0.1.0"

__all__ = ["Model", "ModelConfig", "apply", "describe", "is_orbax_checkpoint", "load", "save", "save_orbax",
           "__version__"]
