"""Where a command may write: every output is checked against every input before any work.

An output is refused when it is, contains or lies inside one of the command's inputs (after resolving
symlinks: `--overwrite` must never delete what the command reads), when it overlaps another output of the
same command, when it exists and `overwrite` was not given (`OutputExistsError`), when it is a file where a
folder is written (or the reverse), and when its folder cannot be written. Writing itself goes through
`atomic` (a temporary sibling published at the very end), so nothing is deleted before the work is done.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from enchtable_jax.converters.atomic import OutputExistsError, check_destination, recover, staging_folder
from enchtable_jax.errors import EnchtableError


def input_paths(value: Any) -> list[Path]:
    """The resolved paths an input names: a path, a loaded Model (its source folder), a list of them, or none."""
    if value is None:
        return []
    if isinstance(value, (str, os.PathLike)):
        return [Path(value).expanduser().resolve()]
    if isinstance(value, (list, tuple, set, frozenset)):
        return [p for item in value for p in input_paths(item)]
    for attribute in ("source", "folder"):  # models.model.Model, merging.sources.Source
        if isinstance(getattr(value, attribute, None), (str, os.PathLike)):
            return input_paths(getattr(value, attribute))
    return []


def template_input(template: str | os.PathLike | None) -> Path | None:
    """The file a `--template` value names (an input of the command), or None for a template name (chatml...)."""
    if template is None or not os.path.lexists(Path(template).expanduser()):
        return None
    return Path(template)


def overlap(out: Path, other: Path) -> str | None:
    """How resolved `out` relates to resolved `other`: 'is', 'contains', 'is inside', or None."""
    if out == other:
        return "is"
    if other.is_relative_to(out):
        return "contains"
    if out.is_relative_to(other):
        return "is inside"
    return None


def _check_writable(out: Path, option: str) -> None:
    """The nearest existing folder above `out` must be a folder this process can write in."""
    ancestor = out.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise EnchtableError(f"{option} {out}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise EnchtableError(f"{option} {out}: cannot write in {ancestor} (permission denied or read-only)")


def check_output(out: str | Path, inputs: Mapping[str, Any] | None = None, overwrite: bool = False,
                 option: str = "--out", *, file: bool = False, exists_ok: bool = False) -> Path:
    """The resolved output path, refused (before any work) when unsafe or impossible; see the module docstring.

    inputs: {option name: path, Model, list of them or None}. file: the output is a file, not a folder.
    exists_ok: an existing output is the caller's business (a resumable run), not refused here.
    Also recovers what a killed earlier publish left beside the output (`atomic.recover`).
    """
    out = Path(out).expanduser().resolve()
    for name, value in (inputs or {}).items():
        for path in input_paths(value):
            relation = overlap(out, path)
            if relation is not None:
                raise EnchtableError(f"{option} {out} {relation} the input {name} {path}; choose an output "
                                     "outside every input")
    if file:
        recover(out)  # the temporary files (`write_json`) of killed earlier runs
        if out.is_dir():
            raise EnchtableError(f"{option} {out} is a folder; a file is written there")
        if out.exists() and not overwrite and not exists_ok:
            raise OutputExistsError(f"{option} {out} already exists; choose another output or pass --overwrite "
                                    "(overwrite=True)")
    else:
        if out.exists() and not out.is_dir():
            raise EnchtableError(f"{option} {out} is a file; a folder is written there")
        try:
            check_destination(out, overwrite or exists_ok)
        except OutputExistsError as e:
            raise OutputExistsError(f"{option} {e}") from None
    _check_writable(out, option)
    return out


def check_outputs(outputs: Mapping[str, str | Path | None], inputs: Mapping[str, Any] | None = None,
                  overwrite: bool = False, exists_ok: Collection[str] = ()) -> dict[str, Path]:
    """`check_output` for each of a command's outputs ({option: path or None}; those named in `exists_ok` may
    exist), and no output may be, contain or lie inside another; returns {option: resolved path} of the given ones."""
    checked = {name: check_output(path, inputs, overwrite, name, exists_ok=name in exists_ok)
               for name, path in outputs.items() if path is not None}
    names = list(checked)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            relation = overlap(checked[a], checked[b])
            if relation is not None:
                raise EnchtableError(f"{a} {checked[a]} {relation} {b} {checked[b]}; give the outputs separate "
                                     "folders")
    return checked


def shared_staging_folder(path: Path) -> Path:
    """`atomic.staging_folder(path)` made by process 0, its path returned on every process (the processes of a
    multi-process run train into one folder, on a shared filesystem)."""
    import jax
    import numpy as np

    if jax.process_count() == 1:
        return staging_folder(path)
    from jax.experimental import multihost_utils

    raw = np.zeros(4096, np.uint8)
    if jax.process_index() == 0:
        encoded = os.fsencode(staging_folder(path))
        raw[:len(encoded)] = np.frombuffer(encoded, np.uint8)
    shared = np.asarray(multihost_utils.broadcast_one_to_all(raw))
    return Path(os.fsdecode(shared.tobytes().rstrip(b"\0")))
