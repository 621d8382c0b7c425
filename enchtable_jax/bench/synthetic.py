"""Random HF model folders for the studies, written tensor by tensor (never a whole model in memory).

Every tensor is a function of (seed, tensor name), so a task model is its base plus noise without
holding the base, and folders written at different times agree.
"""

from __future__ import annotations

import json
import shutil
import zlib
from collections.abc import Callable, Collection, Mapping
from pathlib import Path

import jax
import numpy as np

from enchtable_jax.converters import peft, safetensors_format as stf
from enchtable_jax.converters.hf import HFWriter
from enchtable_jax.converters.safety_vector import write_vector
from enchtable_jax.models.config import ModelConfig
from enchtable_jax.models.identity import WeightsDigest, config_digest
from enchtable_jax.models.tensors import expected_shapes

BASE_STD = 0.02
TensorFn = Callable[[str, tuple[int, ...]], np.ndarray]


def shapes_of(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """{name: shape} of every tensor of the model, in HF order."""
    return {n: tuple(s) for n, s in expected_shapes(config).items()}


def layer_matrices(shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    """Every 2-D matrix of the decoder layers (attention and MLP): what a safety vector covers."""
    return [n for n, s in shapes.items() if n.startswith("model.layers.") and len(s) == 2]


def noise(seed: int, name: str, shape: tuple[int, ...], std: float) -> np.ndarray:
    """float32 N(0, std²) entries determined by (seed, name)."""
    x = np.random.default_rng([seed, zlib.crc32(name.encode())]).standard_normal(shape, dtype=np.float32)
    x *= std
    return x


def base_tensor(name: str, shape: tuple[int, ...]) -> np.ndarray:
    """A base model's tensor: unit norm weights, N(0, BASE_STD²) everything else."""
    return np.ones(shape, np.float32) if name.endswith("norm.weight") else noise(0, name, shape, BASE_STD)


def perturbed(seed: int, std: float, only: Collection[str] | None = None) -> TensorFn:
    """Tensors of a model derived from the base: base + N(0, std²) noise (on `only` the named tensors)."""

    def make(name: str, shape: tuple[int, ...]) -> np.ndarray:
        x = base_tensor(name, shape)
        if only is None or name in only:
            x += noise(seed, name, shape, std)
        return x

    return make


def write_model(path: Path, config: ModelConfig, make: TensorFn = base_tensor, shard_size: int | str = "5GB") -> Path:
    """An HF folder (float32) at `path` whose tensors are `make(name, shape)`, streamed into shards."""
    shapes = shapes_of(config)
    specs = {n: jax.ShapeDtypeStruct(s, np.float32) for n, s in shapes.items()}
    with HFWriter(path, config, specs, shard_size=shard_size, progress=False, overwrite=True) as writer:
        for name, shape in shapes.items():
            writer.add(name, make(name, shape))
    return writer.path


def folder_bytes(folder: Path) -> int:
    """Bytes of the safetensors files of a folder."""
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


def write_safety_vector(folder: Path, base_folder: Path, names: Collection[str], seed: int, std: float) -> Path:
    """A safety-vector folder of N(0, std²) τ on `names`, whose manifest names the base written by
    `write_model(base_folder, config)` (its digest recomputed from `base_tensor`, not read back)."""
    config = ModelConfig.from_file(Path(base_folder) / "config.json")
    shapes = shapes_of(config)
    digest = WeightsDigest()
    for name in sorted(shapes):
        digest.update(name, base_tensor(name, shapes[name]))
    manifest = {"base_model": {"model_type": config.model_type, "config_sha256": config_digest(config),
                               "weights_blake2b": digest.hexdigest()},
                "scope": "synthetic", "note": "random, for the speed studies"}
    write_vector(folder, {n: noise(seed, n, shapes[n], std) for n in names}, manifest)
    shutil.rmtree(folder / "safety_vector")  # the orbax copy: a merge reads the safetensors file
    return folder


def write_lora_adapter(folder: Path, config: ModelConfig, rank: int, seed: int) -> Path:
    """A PEFT LoRA adapter folder of rank `rank` on every decoder-layer matrix (lora_alpha = 2·rank, so scale 2):
    A [r, in] ~ N(0, 1/in) and B [out, r] ~ N(0, 0.01²), functions of (seed, key) like every tensor here."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shapes = shapes_of(config)
    tensors = {}
    for name in layer_matrices(shapes):
        out, inp = shapes[name]
        module = peft.PREFIX + name.removesuffix(".weight")
        tensors[f"{module}.lora_A.weight"] = noise(seed, f"{module}.lora_A", (rank, inp), inp ** -0.5)
        tensors[f"{module}.lora_B.weight"] = noise(seed, f"{module}.lora_B", (out, rank), 0.01)
    modules = sorted({n.removesuffix(".weight").rsplit(".", 1)[-1] for n in layer_matrices(shapes)})
    settings = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
                "target_modules": modules, "bias": "none", "use_rslora": False, "use_dora": False,
                "fan_in_fan_out": False, "base_model_name_or_path": None}
    (folder / peft.CONFIG).write_text(json.dumps(settings, indent=2))
    stf.write_file(folder / peft.WEIGHTS, list(tensors.items()), np.asarray, {"format": "pt"})
    return folder
