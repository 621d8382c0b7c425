"""Model identity: digests of a config and of the weights, so that artefacts made from one model
(safety vectors, training checkpoints) can refuse to be used with another; and the package versions
every artefact records."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from enchtable_jax.errors import EnchtableError
from enchtable_jax.models.config import ModelConfig

# Config fields that do not change what the weights compute (bookkeeping written by tools).
_VOLATILE = {"transformers_version", "_name_or_path", "dtype", "torch_dtype", "use_cache", "architectures"}


def config_digest(config: ModelConfig) -> str:
    """sha256 of the config.json fields that define the architecture."""
    fields = {k: v for k, v in config.hf.items() if k not in _VOLATILE}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


class WeightsDigest:
    """blake2b of tensors' names, dtypes, shapes and bytes, fed one tensor at a time in name order."""

    def __init__(self):
        self._hash = hashlib.blake2b(digest_size=32)
        self._last = ""

    def update(self, name: str, arr: np.ndarray) -> None:
        if name <= self._last:
            raise ValueError(f"tensors must be digested in name order ({name!r} after {self._last!r})")
        self._last = name
        arr = np.ascontiguousarray(arr)
        self._hash.update(f"{name}|{arr.dtype.name}|{arr.shape}|".encode())
        self._hash.update(arr.reshape(-1).view(np.uint8).data)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def weights_digest(params: Mapping[str, jax.Array]) -> str:
    """`WeightsDigest` of a whole parameter dict (independent of its order)."""
    digest = WeightsDigest()
    for name in sorted(params):
        digest.update(name, np.asarray(jax.device_get(params[name])))
    return digest.hexdigest()


def identity(config: ModelConfig, params: Mapping[str, jax.Array]) -> dict[str, str]:
    """{'model_type', 'config_sha256', 'weights_blake2b'}: what a safety vector records of its base model."""
    return {"model_type": config.model_type, "config_sha256": config_digest(config),
            "weights_blake2b": weights_digest(params)}


def check_base(manifest: Mapping[str, Any], base_identity: Mapping[str, str], what: str) -> None:
    """Refuse a safety vector made from another base model than `base_identity` describes."""
    made_from = manifest.get("base_model", {})
    for key in ("model_type", "config_sha256", "weights_blake2b"):
        if made_from.get(key) != base_identity.get(key):
            raise EnchtableError(f"{what}: safety vector was distilled from another model ({key} "
                                 f"{str(made_from.get(key))[:16]} != {str(base_identity.get(key))[:16]}); a safety "
                                 "vector applies only to models fine-tuned from the model it was distilled from: distill "
                                 "one from this base model (enchtable distill --model BASE)")


def versions() -> dict[str, str]:
    """Package versions recorded with every artefact."""
    found = {}
    for package in ("enchtable-jax", "jax", "jaxlib", "optax", "orbax-checkpoint", "transformers", "numpy"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found
