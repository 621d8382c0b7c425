"""A `Model` from any supported folder and back: load an HF folder or orbax checkpoint (also as a flax.nnx
`CausalLM`), save either, describe one from its headers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from enchtable_jax.converters.hf import (DEFAULT_SHARD_SIZE, Sharding, index_weights, read_hf, write_hf)
from enchtable_jax.converters.orbax_io import check_version, is_orbax_checkpoint, orbax_specs, read_orbax, write_orbax
from enchtable_jax.converters.outputs import check_output
from enchtable_jax.models.config import ModelConfig
from enchtable_jax.models.init import count_parameters
from enchtable_jax.models.model import Model
from enchtable_jax.models.nnx import CausalLM, from_nnx
from enchtable_jax.models.tensors import check_shapes
from enchtable_jax.nonfinite import check_params, device_finite, output_error


def _kind(path: Path) -> str:
    if is_orbax_checkpoint(path):
        return "orbax"
    if (path / "config.json").is_file():
        return "hf"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    raise FileNotFoundError(f"{path}: neither an HF model folder (config.json + weights) nor an enchtable orbax "
                            "checkpoint; config.json is missing")


def load(path: str | Path, dtype: Any = None, sharding: Sharding = None, progress: bool | None = None,
         allow_nonfinite: bool = False) -> Model:
    """Load an HF folder or an orbax checkpoint written by `save_orbax`.

    A tensor holding NaN or Inf is an error naming the file and the tensor, unless `allow_nonfinite`.

    dtype: cast floating tensors (default: keep the stored dtype; bf16 stays bf16).
    sharding: a `jax.sharding.Sharding` for every tensor, or a function (name, shape) -> Sharding, so a
    model larger than one device is placed tensor by tensor onto a mesh.
    """
    path = Path(path).expanduser().resolve()
    if _kind(path) == "orbax":
        config, params = read_orbax(path, dtype=dtype, sharding=sharding)
        check_params(params, path, allow_nonfinite)  # on the devices the restore put them on
    else:
        config, params = read_hf(path, dtype=dtype, sharding=sharding, progress=progress,
                                 allow_nonfinite=allow_nonfinite)
    return Model(config, params, path)


def load_nnx(path: str | Path, dtype: Any = None, sharding: Sharding = None, progress: bool | None = None,
             allow_nonfinite: bool = False) -> CausalLM:
    """`load` as a flax.nnx `CausalLM` (models/nnx.py) over the loaded arrays; same arguments."""
    return load(path, dtype=dtype, sharding=sharding, progress=progress, allow_nonfinite=allow_nonfinite).to_nnx()


def save(model: Model | CausalLM, path: str | Path, like: str | Path | None = None,
         shard_size: int | str = DEFAULT_SHARD_SIZE, overwrite: bool = False, progress: bool | None = None) -> Path:
    """Write `model` as an HF folder that `transformers.AutoModelForCausalLM.from_pretrained` loads.

    like: folder whose tokenizer / chat-template / generation-config files are copied (default: the
    folder the model was loaded from). shard_size: bytes or a string such as '5GB'. Atomic: an
    interrupted save never leaves a complete-looking folder, and `path` may not be, contain or lie inside
    the `like` folder (by default the model's source). Returns the folder's absolute path. A `CausalLM` is
    written from its current Param values.
    """
    model = from_nnx(model) if isinstance(model, CausalLM) else model
    like = like if like is not None else model.source
    path = check_output(path, {"like": like}, overwrite, "path")
    return write_hf(path, model.config, model.params, like=like,
                    shard_size=shard_size, overwrite=overwrite, progress=progress)


def save_orbax(model: Model | CausalLM, path: str | Path, like: str | Path | None = None,
               overwrite: bool = False) -> Path:
    """Write `model` (or a `CausalLM`) as an orbax checkpoint folder (with config and tokenizer files); returns its
    path. Atomic, and `path` may not be, contain or lie inside the `like` folder (by default the model's source)."""
    model = from_nnx(model) if isinstance(model, CausalLM) else model
    like = like if like is not None else model.source
    path = check_output(path, {"like": like}, overwrite, "path")
    for name, finite in device_finite(model.params).items():  # never write a non-finite model
        if not finite:
            raise output_error(str(path), name, model.params[name])
    return write_orbax(path, model.config, model.params, like=like, overwrite=overwrite)


def describe(path: str | Path) -> dict[str, Any]:
    """What is in a model folder or checkpoint, read from headers and metadata only (no tensor data)."""
    path = Path(path).expanduser().resolve()
    kind = _kind(path)
    config = ModelConfig.from_file(path / "config.json")
    if kind == "orbax":
        check_version(path)
        specs = orbax_specs(path)
        files = [{"file": "params/", "bytes": sum(f.stat().st_size for f in (path / "params").rglob("*")
                                                 if f.is_file())}]
    else:
        index = index_weights(path)
        specs = {n: (s.shape, s.dtype) for n, s in index.tensors.items()}
        files = [{"file": f.name, "bytes": f.stat().st_size} for f in index.files]
    extras = check_shapes(config, {n: s for n, (s, _) in specs.items()}, str(path))
    dtypes: dict[str, int] = {}
    for shape, dtype in specs.values():
        dtypes[np.dtype(dtype).name] = dtypes.get(np.dtype(dtype).name, 0) + int(np.prod(shape))
    c = config
    return {
        "path": str(path),
        "format": kind if kind == "orbax" else f"hf ({index.format})",
        "architecture": (c.hf.get("architectures") or [c.model_type])[0],
        "model_type": c.model_type,
        "layers": c.num_hidden_layers,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "attention_heads": c.num_attention_heads,
        "kv_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "vocab_size": c.vocab_size,
        "rope": {"type": c.rope.rope_type, "theta": c.rope_theta},
        "sliding_window": sorted({w for w in c.sliding_windows if w is not None}) or None,
        "tied_head": c.tie_word_embeddings,
        "parameters": count_parameters({n: s for n, (s, _) in specs.items()}),
        "tensors": len(specs),
        "dtypes": dtypes,
        "files": files,
        "extra_tensors": extras,
    }
