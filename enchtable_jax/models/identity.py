"""Model identity: digests of a config and of the weights, so that artefacts made from one model
(safety vectors, training checkpoints) can refuse to be used with another."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

import jax
import numpy as np

from enchtable_jax.models.config import ModelConfig

# Config fields that do not change what the weights compute (bookkeeping written by tools).
_VOLATILE = {"transformers_version", "_name_or_path", "dtype", "torch_dtype", "use_cache", "architectures"}


def config_digest(config: ModelConfig) -> str:
    """sha256 of the config.json fields that define the architecture."""
    fields = {k: v for k, v in config.hf.items() if k not in _VOLATILE}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def weights_digest(params: Mapping[str, jax.Array]) -> str:
    """blake2b of every tensor's name, dtype, shape and bytes, in name order (order-independent)."""
    h = hashlib.blake2b(digest_size=32)
    for name in sorted(params):
        arr = np.asarray(jax.device_get(params[name]))
        h.update(f"{name}|{arr.dtype.name}|{arr.shape}|".encode())
        h.update(np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data)
    return h.hexdigest()


def identity(config: ModelConfig, params: Mapping[str, jax.Array]) -> dict[str, str]:
    """{'model_type', 'config_sha256', 'weights_blake2b'}: what a safety vector records of its base model."""
    return {"model_type": config.model_type, "config_sha256": config_digest(config),
            "weights_blake2b": weights_digest(params)}
