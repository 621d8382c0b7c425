"""The base model's weights digest, remembered per machine, so that merging many fine-tunes of one base hashes it once.

A merge with a safety vector checks that the vector was distilled from this base: the blake2b of every base tensor
(`models.identity.WeightsDigest`), 0.9 s of SmolLM2-135M's 540 MB and most of a cached or LoRA merge's time. The
digest is a function of the bytes of the files the base folder's tensors come from, so it is remembered with the
files' identity: path, size, inode, device, mtime_ns and ctime_ns. Any write to a file, a replacement, a rename or
a copy in its place changes the inode or ctime (which, unlike mtime, no user call can set back), and the record is
then not used: the digest is computed again. The record also lists the base tensors that are not finite, which pass
1 finds on the same reads. Records live in $XDG_CACHE_HOME/enchtable-jax/weights-digests/ (one small JSON file per
folder, the last KEPT); where that cannot be written, nothing is remembered and every merge hashes as before.
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


def _identity(source: TensorSource) -> list[list] | None:
    """[[path, size, inode, device, mtime_ns, ctime_ns], ...] of the files the source's tensors come from, sorted;
    None for a source without files (a model in memory) or when one cannot be read."""
    files = sorted({str(Path(f).resolve()) for f in source.files().values()})
    if not files:
        return None
    try:
        return [[f, s.st_size, s.st_ino, s.st_dev, s.st_mtime_ns, s.st_ctime_ns] for f in files
                for s in [os.stat(f)]]
    except OSError:
        return None


def _path(source: TensorSource) -> Path:
    return record_dir() / f"{hashlib.sha256(str(source.folder).encode()).hexdigest()[:32]}.json"


def recall(source: TensorSource) -> tuple[Record | None, list[list] | None]:
    """(the remembered digest of `source`'s weights if its files are those it was taken of, else None; the files'
    identity now, to pass to `remember`)."""
    files = _identity(source)
    if files is None or source.folder is None:
        return None, files
    with contextlib.suppress(Exception):  # a missing, unreadable or foreign record is no record
        saved = read_json(_path(source))
        if saved.get("scheme") == SCHEME and saved.get("files") == files:
            return Record(str(saved["weights_blake2b"]), tuple(map(str, saved["nonfinite"]))), files
    return None, files


def remember(source: TensorSource, files: list[list] | None, record: Record) -> None:
    """Store `record` for `source`, if its files are still those `recall` saw before they were read (a file changed
    while it was hashed is not remembered). Silent where the record folder cannot be written."""
    if files is None or source.folder is None or _identity(source) != files:
        return
    with contextlib.suppress(OSError):
        record_dir().mkdir(parents=True, exist_ok=True)
        write_json(_path(source), {"scheme": SCHEME, "folder": str(source.folder), "files": files,
                                   "weights_blake2b": record.weights_blake2b, "nonfinite": list(record.nonfinite)})
        records = sorted(record_dir().glob("*.json"), key=lambda p: p.stat().st_mtime_ns)
        for stale in records[:-KEPT]:  # the least recently written go
            stale.unlink(missing_ok=True)


__all__ = ["Record", "recall", "record_dir", "remember"]
