"""Publish a folder so that a crash at any instant leaves the old or the new one complete under its name.

A folder is written into a hidden sibling `.NAME.tmp-PID-XXXXXXXX` and published at the very end:
- a new output is renamed in with renameat2(RENAME_NOREPLACE): a folder that appeared at NAME while the
  command ran is never replaced (without `overwrite`);
- with `overwrite`, renameat2(RENAME_EXCHANGE) swaps the two folders in one step; the old folder, now under
  the temporary name, is then deleted.
Where renameat2 is missing (not Linux, or a filesystem that answers EINVAL/ENOSYS) the fallback is an
existence check then a rename for a new output (a folder created in the microseconds between them would be
replaced only if empty: a POSIX rename never replaces a non-empty folder), and two renames for an overwrite:
the old folder to `.NAME.old-PID-XXXXXXXX`, the new one in. A crash between those two leaves nothing at NAME;
`check_destination` (which every command runs on its outputs before any work) then renames the old folder
back, and deletes the `.tmp-`/`.old-` siblings of NAME left by processes that are no longer running.
Standard library only, so that it can be tested in a bare child process that kills itself mid-way.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import platform
import re
import secrets
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


class OutputExistsError(FileExistsError):
    """The destination exists and overwriting was not asked for."""


# Called with the name of each step of a publish ("written", "exchanged", "moved-old", "moved-new",
# "published"): a no-op, replaced only by tests that kill the process at that step.
_fault_point: Callable[[str], None] = lambda step: None

_AT_FDCWD, _RENAME_NOREPLACE, _RENAME_EXCHANGE = -100, 1, 2
_SYSCALL_RENAMEAT2 = {"x86_64": 316, "aarch64": 276}
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP}
_DEBRIS = re.compile(r"(?P<pid>\d+)-[a-z0-9_]{8}")


def _renameat2(src: Path, dst: Path, flags: int) -> None:
    """Linux renameat2(2) through libc (or the raw syscall); OSError(ENOSYS) where there is none."""
    if sys.platform != "linux":
        raise OSError(errno.ENOSYS, "renameat2 is Linux only")
    libc = ctypes.CDLL(None, use_errno=True)
    args = (ctypes.c_int(_AT_FDCWD), os.fsencode(src), ctypes.c_int(_AT_FDCWD), os.fsencode(dst),
            ctypes.c_uint(flags))
    if hasattr(libc, "renameat2"):
        rc = libc.renameat2(*args)
    elif platform.machine() in _SYSCALL_RENAMEAT2:
        rc = libc.syscall(ctypes.c_long(_SYSCALL_RENAMEAT2[platform.machine()]), *args)
    else:
        raise OSError(errno.ENOSYS, "renameat2 unavailable")
    if rc != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(src), None, str(dst))


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename `src` to `dst`; OutputExistsError if `dst` exists (fallback: a check, then a rename)."""
    try:
        _renameat2(src, dst, _RENAME_NOREPLACE)
        return
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise OutputExistsError(f"{dst} appeared while this command ran; it was left as it is "
                                    "(pass --overwrite / overwrite=True to replace it)") from None
        if e.errno not in _UNSUPPORTED:
            raise
    if os.path.lexists(dst):
        raise OutputExistsError(f"{dst} appeared while this command ran; it was left as it is "
                                "(pass --overwrite / overwrite=True to replace it)")
    os.rename(src, dst)


def _remove(path: Path) -> None:
    """Delete a folder tree, a file or a link."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine (True when unsure: debris is kept rather than lost)."""
    if pid == os.getpid() or os.name != "posix":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _debris(path: Path) -> dict[str, list[Path]]:
    """The `.NAME.tmp-PID-*` and `.NAME.old-PID-*` siblings of `path` whose process is gone."""
    found: dict[str, list[Path]] = {"tmp": [], "old": []}
    if not path.parent.is_dir():
        return found
    for entry in path.parent.iterdir():
        for kind in found:
            prefix = f".{path.name}.{kind}-"
            match = _DEBRIS.fullmatch(entry.name[len(prefix):]) if entry.name.startswith(prefix) else None
            if match and not _alive(int(match["pid"])):
                found[kind].append(entry)
    return found


def recover(path: Path) -> None:
    """Undo what a killed publish of `path` left: put the old folder back if nothing is at `path`, then
    delete the temporary and old siblings of dead processes."""
    found = _debris(path)
    old = sorted(found["old"], key=lambda p: p.lstat().st_ctime)
    if old and not os.path.lexists(path):
        os.rename(old.pop(), path)  # the most recently moved-away folder is the one that stood there
    for entry in found["tmp"] + old:
        _remove(entry)


def check_destination(path: str | Path, overwrite: bool) -> Path:
    """Absolute destination path, after `recover`; refuses an existing one unless `overwrite`, and anything
    but a folder (run before any work)."""
    path = Path(path).expanduser().resolve()
    recover(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} already exists; choose another output or pass overwrite=True "
                                "(--overwrite on the command line)")
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"{path} exists and is not a folder; remove it or choose another output")
    return path


def staging_folder(path: Path) -> Path:
    """A new empty hidden sibling `.NAME.tmp-PID-XXXXXXXX` of `path` to write into."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the finished folder should read like any other
    return tmp


def publish(tmp: Path, path: Path, overwrite: bool) -> None:
    """Move the finished folder `tmp` to `path`; an existing `path` is replaced only with `overwrite`, and
    at every instant `path` holds the old or the new folder complete (see the module's docstring)."""
    _fault_point("written")
    try:
        rename_noreplace(tmp, path)
        _fault_point("published")
        return
    except OutputExistsError:
        if not overwrite:
            raise
    try:
        _renameat2(tmp, path, _RENAME_EXCHANGE)
    except OSError as e:
        if e.errno not in _UNSUPPORTED:
            raise
    else:
        _fault_point("exchanged")
        _remove(tmp)  # the old folder, swapped out
        _fault_point("published")
        return
    old = path.with_name(f".{path.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
    os.rename(path, old)
    _fault_point("moved-old")
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(old, path)
        raise
    _fault_point("moved-new")
    _remove(old)
    _fault_point("published")


@contextlib.contextmanager
def atomic_folder(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder; on success it is published at `path` (`publish`), on failure removed."""
    path = check_destination(path, overwrite)
    tmp = staging_folder(path)
    try:
        yield tmp
        publish(tmp, path, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: str | Path, value: Any, overwrite: bool = True) -> Path:
    """`value` as indented JSON at `path`, through a temporary sibling renamed into place: never half written.
    Without `overwrite`, an existing file (even one that appeared meanwhile) is kept: OutputExistsError.
    The temporary file `.NAME.tmp-PID-XXXXXXXX` is this process's own (removed on any failure; one left by a
    killed process is removed by `recover`, which `outputs.check_output` runs)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        tmp.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, path) if overwrite else rename_noreplace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
