"""Reading a folder without leaving it: contained paths and strict JSON.

Every path that a file inside a model, checkpoint or safety-vector folder names (an index's shard names, a
tokenizer config's `*_file` entries) and every file read from such a folder must resolve, after symlinks,
inside the folder; otherwise it is refused with a message naming the file and the field. The one widening
is the Hugging Face cache layout: in `.../snapshots/REV/` the files are symlinks into `.../blobs/`, which
is part of the same downloaded repository.

`read_json` reads a JSON file as UTF-8 and says which file is wrong and how, instead of a bare decoder error;
`read_json_or_jsonl` reads a file of records that is either one JSON value or JSON lines.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from enchtable_jax.errors import EnchtableError


class UnsafePathError(EnchtableError):
    """A path inside a folder's files that points outside that folder."""


class JSONFileError(EnchtableError):
    """A JSON file that is not UTF-8, not JSON, or not of the expected shape."""


class MissingFileError(EnchtableError, FileNotFoundError):
    """A file that another file of the folder names is absent (also a FileNotFoundError)."""


def roots(folder: str | Path) -> tuple[Path, ...]:
    """The real directories whose files count as inside `folder` (itself; the cache's blobs for a snapshot)."""
    real = Path(os.path.realpath(folder))
    found = [real]
    if real.parent.name == "snapshots" and (real.parent.parent / "blobs").is_dir():
        found.append(real.parent.parent / "blobs")
    return tuple(found)


def _within(path: Path, allowed: tuple[Path, ...]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in allowed)


def contained(folder: str | Path, name: Any, source: str | Path, field: str) -> Path:
    """`folder / name` resolved, when `name` (read from `source`'s `field`) is a relative path that stays inside.

    Refused: a non-string or empty name, an absolute path, a NUL byte, and a name that leaves the folder by
    `..` or by a symlink. The returned path is the resolved one, so the file opened is the file checked.
    """
    if not isinstance(name, str) or not name or "\x00" in name:
        raise UnsafePathError(f"{source}: field {field} must be a file name inside the folder, got {name!r}")
    if os.path.isabs(name) or Path(name).anchor:
        raise UnsafePathError(f"{source}: field {field} is the absolute path {name!r}; only names inside the "
                              f"folder {folder} are read")
    resolved = Path(os.path.realpath(Path(folder) / name))
    if not _within(resolved, roots(folder)):
        raise UnsafePathError(f"{source}: field {field} names {name!r}, which resolves to {resolved}, outside the "
                              f"folder {folder}; refused (weights and tokenizer files are only read from inside it)")
    return resolved


def check_inside(folder: str | Path, path: str | Path) -> Path:
    """`path` (a file of `folder` found by its fixed name) resolved, refused if a symlink takes it outside."""
    resolved = Path(os.path.realpath(path))
    if not _within(resolved, roots(folder)):
        raise UnsafePathError(f"{path}: is a symlink to {resolved}, outside the folder {folder}; refused (files are "
                              "only read from inside the folder they were given in)")
    return resolved


def check_tree(folder: str | Path) -> None:
    """Every entry below `folder` (recursively) stays inside it after symlinks."""
    folder = Path(folder)
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            entry = Path(dirpath) / name
            if entry.is_symlink():
                check_inside(folder, entry)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} appears twice")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json(raw: bytes, source: str | Path) -> Any:
    """Strict JSON from bytes: UTF-8, no duplicate keys, no NaN/Infinity; errors name `source`."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise JSONFileError(f"{source}: not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r}); "
                            "a JSON file must be UTF-8") from e
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:
        raise JSONFileError(f"{source}: not valid JSON ({e})") from e


def read_json(path: str | Path, expect: type | None = dict) -> Any:
    """The JSON value in file `path`; with `expect`, refused unless it is of that type (default: an object)."""
    path = Path(path)
    value = parse_json(path.read_bytes(), path)
    if expect is not None and not isinstance(value, expect):
        kind = {dict: "object", list: "array"}.get(expect, expect.__name__)
        raise JSONFileError(f"{path}: the file must hold a JSON {kind}, got {type(value).__name__}")
    return value


def _one_value(text: str) -> bool:
    """Whether `text` is one JSON value by syntax alone (else it is read as JSONL, line by line)."""
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return False
    return True


def read_json_or_jsonl(path: str | Path, error: type[ValueError] = ValueError) -> tuple[Any, list[int] | None]:
    """(content, line numbers): a JSON file's value and None, or a JSONL file's values and their line numbers.

    A file starting with '[' is one JSON list; otherwise the whole file is tried as one JSON value (an
    object, e.g. nested categories), then as JSONL (blank lines skipped). Errors, raised as `error`,
    name the file and line.
    """
    path = Path(path)
    if path.is_dir():
        raise error(f"{path}: is a folder; give the JSON or JSONL file in it")
    if not path.is_file():
        raise error(f"{path}: file not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text ({e})") from None
    try:
        return parse_json(text.encode("utf-8"), path), None
    except JSONFileError as strict:
        e = strict.__cause__
        if not isinstance(e, json.JSONDecodeError) and _one_value(text):  # a duplicate key, NaN/Infinity
            raise error(f"{path}: invalid JSON ({e})") from None
        if text.lstrip().startswith("["):
            raise error(f"{path}:{e.lineno}: invalid JSON ({e.msg}, column {e.colno})") from None
    values, lines = [], []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:  # strict like every JSON file read: no duplicate keys, no NaN/Infinity
            values.append(parse_json(line.encode("utf-8"), f"{path}:{line_no}"))
        except JSONFileError as e:
            cause = e.__cause__
            detail = f"{cause.msg}, column {cause.colno}" if isinstance(cause, json.JSONDecodeError) else str(cause)
            raise error(f"{path}:{line_no}: invalid JSON ({detail}); JSONL needs one value per line, JSON one "
                        "top-level value") from None
        lines.append(line_no)
    return values, lines
