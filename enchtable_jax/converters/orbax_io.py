"""Parameter dicts as orbax checkpoints, restorable sharded onto a mesh.

Layout of a checkpoint folder: `enchtable.json` (marker and format version), `config.json` (the HF
config), `params/` (orbax StandardCheckpointer: one array per HF tensor name) and the tokenizer /
chat-template files of the source folder, so that the checkpoint converts back to an HF folder
without anything else. Written atomically like HF folders.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from enchtable_jax.converters.atomic import atomic_folder
from enchtable_jax.converters.hf import Sharding, copy_companion_files, is_float
from enchtable_jax.models.config import ModelConfig
from enchtable_jax.models.tensors import check_shapes
from enchtable_jax.errors import EnchtableError, storage_error
from enchtable_jax.safe_io import check_tree, parse_json, read_json

MARKER = "enchtable.json"
FORMAT = "enchtable-orbax"
VERSION = 1


@contextlib.contextmanager
def reading_checkpoint(folder: str | Path, what: str = "orbax checkpoint") -> Iterator[None]:
    """Around orbax/tensorstore reads of `folder`: any failure of a damaged checkpoint (edited metadata, truncated
    or flipped data files; orbax and tensorstore report these as ValueError, KeyError, AttributeError, ...)
    becomes one EnchtableError naming the folder. An OSError (permission, disk) stays an OSError naming its file,
    also when tensorstore reports it as a ValueError with an errno."""
    try:
        yield
    except (EnchtableError, OSError):
        raise
    except Exception as e:  # noqa: BLE001 - every read of a damaged checkpoint ends here
        storage = storage_error(e)
        if isinstance(storage, OSError):
            raise storage from e
        first = " ".join(str(e).split(" See full TensorStore details")[0].split())[:300]
        raise EnchtableError(f"{Path(folder)}: damaged {what}: its files were truncated or edited and cannot be "
                             f"read ({type(e).__name__}{': ' + first if first else ''}); restore it from a copy or "
                             "write it again") from e


def is_orbax_checkpoint(path: str | Path) -> bool:
    """True when `path` is a checkpoint folder written by `write_orbax`."""
    marker = Path(path) / MARKER
    if not marker.is_file():
        return False
    try:
        value = parse_json(marker.read_bytes(), marker)
    except EnchtableError:
        return False
    return isinstance(value, dict) and value.get("format") == FORMAT


def check_version(path: str | Path) -> None:
    """Refuse a checkpoint whose marker (enchtable.json) has a version this enchtable does not know."""
    marker = Path(path) / MARKER
    version = read_json(marker).get("version")
    if type(version) is not int or version != VERSION:
        raise EnchtableError(f"{marker}: field version is {version!r:.100}; this enchtable reads orbax checkpoints "
                             f"of version {VERSION} only (written by another enchtable?)")


def write_orbax(path: str | Path, config: ModelConfig, params: Mapping[str, jax.Array],
                like: str | Path | None = None, overwrite: bool = False) -> Path:
    """Save config + params (+ companion files of `like`) as an orbax checkpoint folder; returns its path."""
    with atomic_folder(path, overwrite) as tmp:
        copy_companion_files(Path(like) if like is not None else None, tmp)
        (tmp / "config.json").write_text(json.dumps(dict(config.hf), indent=2) + "\n")
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(tmp.resolve() / "params", dict(params))
        checkpointer.wait_until_finished()
        checkpointer.close()
        marker = {"format": FORMAT, "version": VERSION, "tensors": list(params)}  # keeps the tensor order
        (tmp / MARKER).write_text(json.dumps(marker, indent=1) + "\n")
    return Path(path).expanduser().resolve()


def orbax_specs(path: str | Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{name: (shape, dtype)} from the checkpoint's metadata, without reading arrays."""
    path = Path(path).expanduser().resolve()
    with reading_checkpoint(path):
        checkpointer = ocp.StandardCheckpointer()
        metadata = checkpointer.metadata(path / "params").item_metadata
        tree = getattr(metadata, "tree", None)
        if not isinstance(tree, Mapping) or not tree:
            raise EnchtableError(f"{path}: damaged orbax checkpoint: params/_METADATA lists no tensors; restore it "
                                 "from a copy or write it again")
        return {str(name): (tuple(int(d) for d in meta.shape), np.dtype(meta.dtype)) for name, meta in tree.items()}


def read_orbax(path: str | Path, dtype=None, sharding: Sharding = None) -> tuple[ModelConfig, dict[str, jax.Array]]:
    """Restore config and params; each array is placed with `sharding` (one, or a function of name and shape)."""
    path = Path(path).expanduser().resolve()
    if not is_orbax_checkpoint(path):
        raise FileNotFoundError(f"{path}: not an enchtable orbax checkpoint (no {MARKER}); write one with "
                                "`enchtable convert HF_DIR OUT`")
    check_version(path)
    check_tree(path)  # orbax and tensorstore follow whatever the folder holds: no symlink may leave it
    config = ModelConfig.from_file(path / "config.json")
    specs = orbax_specs(path)
    check_shapes(config, {n: s for n, (s, _) in specs.items()}, str(path))
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {}
    for name, (shape, stored) in specs.items():
        target_dtype = dtype if dtype is not None and is_float(stored) else stored
        place = sharding(name, shape) if callable(sharding) else sharding
        target[name] = jax.ShapeDtypeStruct(shape, target_dtype, sharding=place or default)
    with reading_checkpoint(path):
        checkpointer = ocp.StandardCheckpointer()
        restored = checkpointer.restore(path / "params", target)
    order = read_json(path / MARKER).get("tensors") or list(specs)
    if not isinstance(order, list) or sorted(map(str, order)) != sorted(restored) or len(set(order)) != len(order):
        raise EnchtableError(f"{path / MARKER}: field tensors must list each of the checkpoint's {len(restored)} "
                             "tensors once; the marker and params/ do not belong together")
    return config, {name: restored[name] for name in order}
