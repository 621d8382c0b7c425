"""The base model's weights digest (and the safety vector file's SHA-256), remembered per machine, so that merging
many fine-tunes of one base hashes them once.

A merge with a safety vector checks that the vector was distilled from this base: the blake2b of every base tensor
(`models.identity.WeightsDigest`), 0.9 s of SmolLM2-135M's 540 MB and most of a cached or LoRA merge's time. The
digest is a function of the bytes of the files the base folder's tensors come from, so it is remembered with the
files' identity: path, size, inode, device, mtime_ns and ctime_ns. Any write to a file, a replacement, a rename or
a copy in its place changes the inode or ctime (which, unlike mtime, no user call can set back), and the record is
then not used: the digest is computed again. The record also lists the base tensors that are not finite, which pass
1 finds on the same reads; the SHA-256 that names a vector's stored decomposition (merging/decomposition.py, 0.5 s
of a cached merge at SmolLM2-135M's shape) is remembered likewise. Records live in
$XDG_CACHE_HOME/enchtable-jax/weights-digests/ (one small JSON file per folder or file, the last KEPT); where that
cannot be written, nothing is remembered and every merge hashes as before.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
from pathlib import Path

from enchtable_jax.converters.atomic import write_json
from enchtable_jax.kernels.compile_cache import cache_root
from enchtable_jax.merging.sources import TensorSource
from enchtable_jax.safe_io import read_json

SCHEME = 1  # of the digest (WeightsDigest's feed) and of the record; a record of another scheme is not used
KEPT = 256  # records kept (about 1 KB each); temporary folders, e.g. a test suite's, come and go


@dataclasses.dataclass(frozen=True)
class Record:
    """What a base folder's files were when their digest was taken."""

    weights_blake2b: str
    nonfinite: tuple[str, ...]  # base tensors holding NaN or Inf, in name order


def record_dir() -> Path:
    return cache_root() / "weights-digests"


def _identity(files: list[str | Path]) -> list[list] | None:
    """[[path, size, inode, device, mtime_ns, ctime_ns], ...] of `files`, resolved and sorted; None when there are
    none or one cannot be read."""
    paths = sorted({str(Path(f).resolve()) for f in files})
    if not paths:
        return None
    try:
        return [[f, s.st_size, s.st_ino, s.st_dev, s.st_mtime_ns, s.st_ctime_ns] for f in paths for s in [os.stat(f)]]
    except OSError:
        return None


def _record_path(key: str) -> Path:
    return record_dir() / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"


def _load(key: str, files: list[list] | None) -> dict | None:
    """The record stored under `key` if it was made of exactly these `files`, else None."""
    if files is None:
        return None
    with contextlib.suppress(Exception):  # a missing, unreadable or foreign record is no record
        saved = read_json(_record_path(key))
        if saved.get("scheme") == SCHEME and saved.get("files") == files:
            return saved
    return None


def _store(key: str, files: list[list] | None, values: dict) -> None:
    """Store `values` under `key`, if the files are still those seen before they were read (a file changed while it
    was hashed is not remembered). Silent where the record folder cannot be written."""
    if files is None or _identity([f[0] for f in files]) != files:
        return
    with contextlib.suppress(OSError):
        record_dir().mkdir(parents=True, exist_ok=True)
        write_json(_record_path(key), {"scheme": SCHEME, "key": key, "files": files, **values})
        records = sorted(record_dir().glob("*.json"), key=lambda p: p.stat().st_mtime_ns)
        for stale in records[:-KEPT]:  # the least recently written go
            stale.unlink(missing_ok=True)


def recall(source: TensorSource) -> tuple[Record | None, list[list] | None]:
    """(the remembered digest of `source`'s weights if its files are those it was taken of, else None; the files'
    identity now, to pass to `remember`)."""
    files = _identity(list(source.files().values())) if source.folder is not None else None
    saved = _load(f"weights:{source.folder}", files)
    if saved is None or not isinstance(saved.get("weights_blake2b"), str) or not isinstance(saved.get("nonfinite"),
                                                                                              list):
        return None, files
    return Record(saved["weights_blake2b"], tuple(map(str, saved["nonfinite"]))), files


def remember(source: TensorSource, files: list[list] | None, record: Record) -> None:
    """Store `record` for `source`, whose files `recall` saw as `files` before they were read."""
    _store(f"weights:{source.folder}", files, {"weights_blake2b": record.weights_blake2b,
                                               "nonfinite": list(record.nonfinite)})


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file (the safety vector's, which keys its stored decomposition), remembered the same way."""
    key = f"sha256:{Path(path).resolve()}"
    files = _identity([path])
    saved = _load(key, files)
    if saved is not None and isinstance(saved.get("sha256"), str):
        return saved["sha256"]
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()  # releases the GIL
    _store(key, files, {"sha256": digest})
    return digest


__all__ = ["Record", "file_sha256", "recall", "record_dir", "remember"]
