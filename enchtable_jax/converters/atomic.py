"""Write a folder so that it appears complete or not at all.

Everything is written into a hidden sibling `.NAME.tmp-XXXX` and renamed into place at the end; on an
error the partial folder is deleted, and after a kill only the hidden temporary is left, which no
loader mistakes for a model.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class OutputExistsError(FileExistsError):
    """The destination exists and overwriting was not asked for."""


def check_destination(path: str | Path, overwrite: bool) -> Path:
    """Absolute destination path; refuses an existing one unless `overwrite` (checked before any work)."""
    path = Path(path).expanduser().resolve()
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} already exists; choose another output or pass overwrite=True "
                                "(--overwrite on the command line)")
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"{path} exists and is not a folder; remove it or choose another output")
    return path


@contextlib.contextmanager
def atomic_folder(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `path`, on failure it is removed."""
    path = check_destination(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the finished folder should read like any other
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
        os.rename(path, old / path.name)
    os.rename(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_json(path: str | Path, value: Any) -> Path:
    """`value` as indented JSON at `path`, through a temporary sibling renamed into place: never half written."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path
