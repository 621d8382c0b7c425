"""HF folders (safetensors, safe `.bin`) and orbax checkpoints ⇄ (config, flat param dict)."""

from enchtable_jax.converters.atomic import OutputExistsError, atomic_folder
from enchtable_jax.converters.hf import HFWriter, index_weights, iter_tensors, read_hf, write_hf
from enchtable_jax.converters.orbax_io import is_orbax_checkpoint, read_orbax, write_orbax
from enchtable_jax.converters.safetensors_format import SafetensorsError
from enchtable_jax.converters.torch_bin import UnsafeCheckpointError

__all__ = [
    "HFWriter", "OutputExistsError", "SafetensorsError", "UnsafeCheckpointError", "atomic_folder", "index_weights",
    "is_orbax_checkpoint", "iter_tensors", "read_hf", "read_orbax", "write_hf", "write_orbax",
]
