"""The safety-vector folder: τ_safe = θ_aligned − θ_harm on the scope's tensors, and its manifest.

Layout of SAFETY_DIR (manifest.json is written last: a folder without it is incomplete):
  safety_vector.safetensors   τ under HF tensor names (only the scope's tensors)
  safety_vector/              the same tensors as an orbax checkpoint (sharded restore)
  manifest.json               base model identity, scope, data, training settings, loss curve, versions
  loss.png                    the loss curve
  checkpoints/                resumable training state (orbax CheckpointManager)
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import orbax.checkpoint as ocp

from enchtable_jax.converters import safetensors_format as stf
from enchtable_jax.errors import EnchtableError
from enchtable_jax.safe_io import check_inside, read_json

FORMAT = "enchtable-safety-vector"
VERSION = 1
MANIFEST = "manifest.json"
TENSORS = "safety_vector.safetensors"


@dataclasses.dataclass(frozen=True)
class SafetyVector:
    """τ_safe on the scope's tensors (HF names) and the manifest describing how it was made."""

    tensors: dict[str, np.ndarray]
    manifest: dict[str, Any]


def write_vector(folder: Path, tensors: Mapping[str, np.ndarray], manifest: dict[str, Any],
                 primary: bool = True) -> None:
    """Write τ (safetensors + orbax) and then the manifest, each file renamed into place when complete.

    Every process calls it (orbax saves collectively); only the `primary` one writes the plain files.
    """
    folder.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save((folder / "safety_vector").resolve(), dict(tensors), force=True)
    checkpointer.wait_until_finished()
    if not primary:
        return
    tmp = folder / f".{TENSORS}.tmp"
    stf.write_file(tmp, list(tensors.items()), np.asarray, {"format": "pt", "content": FORMAT})
    os.replace(tmp, folder / TENSORS)
    manifest = {"format": FORMAT, "version": VERSION, **manifest}
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    os.replace(tmp, folder / MANIFEST)


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of a finished safety-vector folder (errors say what is wrong with the folder)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no {MANIFEST}; not a finished safety vector (was distillation "
                                "interrupted? resume it with `enchtable distill ... --resume`)")
    check_inside(folder, path)
    manifest = read_json(path)  # UTF-8, strict JSON, an object; errors name the file
    if manifest.get("format") != FORMAT:
        raise EnchtableError(f"{path}: not an enchtable safety-vector manifest (format {manifest.get('format')!r})")
    if type(manifest.get("version")) is not int or manifest["version"] != VERSION:
        raise EnchtableError(f"{path}: field version is {manifest.get('version')!r:.100}; this enchtable reads "
                             f"safety-vector manifests of version {VERSION} only (written by another enchtable?)")
    if not isinstance(manifest.get("base_model", {}), dict):
        raise EnchtableError(f"{path}: field base_model is a JSON {type(manifest['base_model']).__name__}, expected "
                             "an object (model_type, config_sha256, weights_blake2b)")
    return manifest


def load_safety_vector(folder: str | Path) -> SafetyVector:
    """Read τ and its manifest from a safety-vector folder."""
    manifest = read_manifest(folder)
    check_inside(folder, Path(folder) / TENSORS)
    infos, _ = stf.read_header(Path(folder) / TENSORS)
    with open(Path(folder) / TENSORS, "rb") as f:
        tensors = {name: stf.read_tensor(f, info) for name, info in infos.items()}
    return SafetyVector(tensors, manifest)
