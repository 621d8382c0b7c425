"""Legacy `pytorch_model*.bin` checkpoints, read without running pickled code.

`torch.load(weights_only=True)` only rebuilds tensors and plain containers; any other pickled object
(a payload that would run code) is refused before it executes.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
from enchtable_jax.errors import EnchtableError, MissingExtraError


class UnsafeCheckpointError(EnchtableError):
    """A `.bin` file that holds something other than tensors."""


def tensor_to_numpy(tensor) -> np.ndarray:
    """A CPU torch tensor as a numpy array of the same dtype and bytes (bfloat16 via ml_dtypes)."""
    import torch

    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits
        return tensor.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.contiguous().numpy()


def load_bin(path: str | Path) -> dict[str, np.ndarray]:
    """All tensors of one `.bin` file as numpy arrays in their stored dtype."""
    try:
        import torch
    except ImportError as e:
        raise MissingExtraError(f"{path}: reading .bin checkpoints needs PyTorch: pip install "
                                "'enchtable-jax[torch]', or convert the checkpoint to safetensors first") from e
    try:
        # mmap only for the zip format; legacy (pre-1.6) files are read whole, equally without running code
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnsafeCheckpointError(
            f"{path}: refused: the file holds pickled objects other than tensors ({reason}); it was not "
            "executed. Convert it to safetensors with a tool you trust, or get a safetensors copy") from e
    except (RuntimeError, EOFError, OSError) as e:
        raise EnchtableError(f"{path}: cannot read this PyTorch checkpoint ({e}); it may be truncated") from e
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UnsafeCheckpointError(f"{path}: expected a dict of tensor name -> tensor, got {type(state).__name__} "
                                    "with non-tensor entries")
    return {name: tensor_to_numpy(t) for name, t in state.items()}
