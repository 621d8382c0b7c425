"""PEFT LoRA adapter folders read as low-rank deltas of their base model's tensors.

A folder holds `adapter_config.json` and `adapter_model.safetensors` (or a legacy `adapter_model.bin`, read only
through the safe loader). PEFT stores the factors of module `M` of the base model as
`base_model.model.M.lora_A.weight` [r, in] and `base_model.model.M.lora_B.weight` [out, r], and merging adds
s·B·A to the base tensor `M.weight` (HF (out, in) layout), with s = lora_alpha / r (`use_rslora`: lora_alpha / √r);
r and lora_alpha per module come from `rank_pattern` / `alpha_pattern`, whose keys are regular expressions matched,
as PEFT matches them, against the end of the module name at a dot boundary (the first key that matches wins).
An embedding stores A [r, vocab] as `lora_embedding_A` and B [dim, r] as `lora_embedding_B` and adds (s·B·A)ᵀ,
so its factors are s·Aᵀ and Bᵀ. What the folder could hold beyond plain LoRA on 2-D weights (DoRA, fan-in-fan-out
layouts, trained biases, whole modules saved, trainable tokens) is refused, naming the file and the field.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from enchtable_jax.converters import safetensors_format as stf
from enchtable_jax.converters.torch_bin import load_bin
from enchtable_jax.errors import EnchtableError
from enchtable_jax.safe_io import check_inside, read_json

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
LEGACY_WEIGHTS = "adapter_model.bin"
PREFIX = "base_model.model."
# factor key suffix -> (which factor, whether the module is an embedding)
_SUFFIXES = {".lora_A.weight": ("a", False), ".lora_B.weight": ("b", False),
             ".lora_embedding_A": ("a", True), ".lora_embedding_B": ("b", True)}
# config fields whose non-default value changes what merging means; refused: (field, the supported value)
_UNSUPPORTED = (("use_dora", False), ("fan_in_fan_out", False), ("bias", "none"), ("lora_bias", False),
                ("modules_to_save", None), ("target_parameters", None), ("trainable_token_indices", None),
                ("layer_replication", None), ("alora_invocation_tokens", None), ("use_bdlora", None),
                ("kasa_config", None), ("monteclora_config", None), ("arrow_config", None))


@dataclasses.dataclass(frozen=True)
class LoraTarget:
    """One base tensor the adapter changes: W + scale·B·A, with the keys of its factors in the adapter's file."""

    name: str  # HF name of the base tensor, e.g. model.layers.0.self_attn.q_proj.weight
    rank: int
    scale: float
    a_key: str
    b_key: str
    embedding: bool  # PEFT stores an embedding's factors transposed


class LoraAdapter:
    """An adapter folder's targets (checked against the base's shapes when given) and their factors, read lazily."""

    def __init__(self, folder: Path, weights: Path, targets: dict[str, LoraTarget], reader):
        self.folder, self.weights, self.targets, self._reader = folder, weights, targets, reader

    def factors(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(scale·B [m, r], A [r, n]) in float32 for base tensor `name`, so that its delta is their product."""
        t = self.targets[name]
        a = self._reader(t.a_key).astype(np.float32)
        b = self._reader(t.b_key).astype(np.float32)
        if t.embedding:
            a, b = b.T, a.T
        return np.ascontiguousarray(b * np.float32(t.scale)), np.ascontiguousarray(a)

    def delta(self, name: str) -> np.ndarray:
        """scale·B·A for base tensor `name` (float32), formed densely."""
        b, a = self.factors(name)
        return b @ a


def is_adapter(folder: str | Path) -> bool:
    """Whether `folder` is a PEFT adapter folder (it holds adapter_config.json)."""
    return (Path(folder) / CONFIG).is_file()


def open_adapter(folder: str | Path, base_shapes: Mapping[str, tuple[int, ...]] | None = None) -> LoraAdapter:
    """Read an adapter folder's config and tensor headers (no factor data) and map its factors to base tensor names.

    With `base_shapes` ({HF name: shape} of the base model), every target must be a 2-D tensor of the base whose
    shape the factors fit. Refused with the file and field or tensor named: an unsupported config, unknown keys,
    a factor without its pair, a rank that differs from the config's.
    """
    folder = Path(folder).expanduser().resolve()
    config_path = check_inside(folder, folder / CONFIG)
    config = read_json(config_path)
    _check_config(config_path, config)
    weights, shapes, reader = _weights(folder)
    modules = _factor_keys(weights, shapes)
    targets = {}
    for module, keys in sorted(modules.items()):
        target = _target(config_path, config, weights, module, keys, shapes)
        if base_shapes is not None:
            _check_fits(weights, target, shapes, base_shapes)
        targets[target.name] = target
    if not targets:
        raise EnchtableError(f"{weights}: holds no LoRA factors (no tensor named {PREFIX}…lora_A.weight); "
                             "nothing to merge")
    return LoraAdapter(folder, weights, targets, reader)


def _check_config(path: Path, config: dict) -> None:
    """Refuse an adapter that is not plain LoRA, naming the field."""
    if config.get("peft_type") != "LORA":
        raise EnchtableError(f"{path}: field peft_type is {config.get('peft_type')!r}; only LoRA adapters "
                             "(peft_type 'LORA') are supported")
    for field, supported in _UNSUPPORTED:
        value = config.get(field, supported)
        if value != supported and not (supported is None and value in ([], {})):
            raise EnchtableError(f"{path}: field {field} is {value!r:.100}; not supported (only plain LoRA on "
                                 f"weight matrices: {field} = {supported!r}). Merge the adapter with PEFT's "
                                 "merge_and_unload() and give the merged model instead")
    for field in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(field) or {}, dict):
            raise EnchtableError(f"{path}: field {field} must be an object mapping module patterns to numbers")


def _weights(folder: Path) -> tuple[Path, dict[str, tuple[int, ...]], object]:
    """(the weights file, {key: shape}, read(key) -> np.ndarray): safetensors read per tensor, or the legacy .bin
    file through the safe loader."""
    path = folder / WEIGHTS
    if path.is_file():
        path = check_inside(folder, path)
        infos, _ = stf.read_header(path)

        def read(key: str) -> np.ndarray:
            with open(path, "rb") as f:
                return stf.read_tensor(f, infos[key])

        return path, {k: i.shape for k, i in infos.items()}, read
    legacy = folder / LEGACY_WEIGHTS
    if legacy.is_file():
        legacy = check_inside(folder, legacy)
        tensors = load_bin(legacy)
        return legacy, {k: v.shape for k, v in tensors.items()}, tensors.__getitem__
    raise EnchtableError(f"{folder}: an adapter folder ({CONFIG} found) without {WEIGHTS} or {LEGACY_WEIGHTS}")


def _factor_keys(weights: Path, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, dict[str, str]]:
    """{module name: {"a": key, "b": key, "embedding": bool}} from the file's keys; any other key is refused."""
    modules: dict[str, dict] = {}
    for key in shapes:
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        if key.endswith(".base_layer.weight"):
            raise EnchtableError(f"{weights}: tensor {key} is a whole base tensor (PEFT's save_embedding_layers), "
                                 "not supported; save the adapter with save_embedding_layers=False")
        if not key.startswith(PREFIX) or suffix is None:
            raise EnchtableError(f"{weights}: tensor {key} is not a LoRA factor ({PREFIX}<module>.lora_A.weight or "
                                 ".lora_B.weight); only plain LoRA adapters are supported")
        factor, embedding = _SUFFIXES[suffix]
        entry = modules.setdefault(key[len(PREFIX):-len(suffix)], {"embedding": embedding})
        entry[factor] = key
    for module, entry in modules.items():
        for factor in "ab":
            if factor not in entry:
                raise EnchtableError(f"{weights}: module {module} has no lora_{factor.upper()} factor; the file is "
                                     "incomplete")
    return modules


def _pattern_value(patterns: Mapping[str, object], module: str, default: object) -> object:
    """PEFT's per-module override: the value of the first pattern that matches the end of `module` at a dot."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _target(path: Path, config: dict, weights: Path, module: str, keys: dict, shapes: Mapping) -> LoraTarget:
    """The module's rank and scale from the config, its rank checked against the stored factors."""
    rank = _pattern_value(config.get("rank_pattern") or {}, module, config.get("r"))
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha"))
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise EnchtableError(f"{path}: field r (or rank_pattern) gives module {module} the rank {rank!r}; a LoRA "
                             "rank is a positive integer")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise EnchtableError(f"{path}: field lora_alpha (or alpha_pattern) gives module {module} {alpha!r}; "
                             "expected a finite number")
    a_shape, b_shape = shapes[keys["a"]], shapes[keys["b"]]
    if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != rank or b_shape[1] != rank:
        raise EnchtableError(f"{weights}: tensor {keys['a']} has shape {tuple(a_shape)} and {keys['b']} "
                             f"{tuple(b_shape)}; rank {rank} (from {CONFIG}) needs A [{rank}, in] and B [out, {rank}]")
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return LoraTarget(f"{module}.weight", rank, float(scale), keys["a"], keys["b"], keys["embedding"])


def _check_fits(weights: Path, target: LoraTarget, shapes: Mapping, base_shapes: Mapping) -> None:
    """Refuse a target the base lacks, or factors whose product is not the base tensor's shape."""
    if target.name not in base_shapes:
        raise EnchtableError(f"{weights}: tensor {target.a_key} adapts {target.name}, which the base model does not "
                             "have; the adapter was trained on another model")
    a, b = shapes[target.a_key], shapes[target.b_key]
    product = (a[1], b[0]) if target.embedding else (b[0], a[1])
    if tuple(base_shapes[target.name]) != product:
        raise EnchtableError(f"{weights}: tensors {target.b_key} {tuple(b)} and {target.a_key} {tuple(a)} make a "
                             f"{product} delta, but the base tensor {target.name} is "
                             f"{tuple(base_shapes[target.name])}; the adapter was trained on another model")


__all__ = ["CONFIG", "LoraAdapter", "LoraTarget", "WEIGHTS", "is_adapter", "open_adapter"]
