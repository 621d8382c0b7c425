"""Host memory that a streaming job frees and allocates again: kept in the process for the job, returned after.

A merge allocates and frees the same large buffers group after group (the τ stacks, XLA's outputs, the merged
tensors). glibc serves every block over its mmap threshold with fresh pages from the kernel and unmaps it on
free, so each group faults in (and the kernel zeroes) hundreds of MB again; on a VM whose freed pages go back to the
host, touching such pages first costs far more (measured on the 2-core machine: 200 MB in 0.21–0.47 s fresh, 0.01
s reused). `reuse_freed_memory` raises glibc's mmap and trim thresholds for the block, so large blocks come from
the heap and freed ones are reused, then trims the heap and sets both thresholds back to glibc's initial 128 KiB.
The thresholds are process-wide: the block changes how fast other threads allocate, never what they compute.
Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import sys
from collections.abc import Iterator

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (malloc.h)
_GLIBC_INITIAL = 128 * 1024  # both thresholds' initial value in glibc
_KEEP = 1 << 30  # blocks up to 1 GiB from the heap; freed memory kept up to 2 GiB - 1 at its top
_KEEP_TOP = 2**31 - 1


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (it has mallopt and malloc_trim), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes, libc.malloc_trim.argtypes = (ctypes.c_int, ctypes.c_int), (ctypes.c_size_t,)
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
    except (OSError, AttributeError):  # musl and others
        return None
    return libc


@contextlib.contextmanager
def reuse_freed_memory() -> Iterator[bool]:
    """Within the block, large blocks come from the heap and freed memory stays in the process for reuse; after it,
    the heap is trimmed (free memory goes back to the system) and glibc's thresholds are 128 KiB again. Yields
    whether the thresholds could be set."""
    libc = _glibc()
    changed = libc is not None and bool(libc.mallopt(_M_MMAP_THRESHOLD, _KEEP)) \
        and bool(libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_TOP))
    try:
        yield changed
    finally:
        if libc is not None:
            libc.mallopt(_M_MMAP_THRESHOLD, _GLIBC_INITIAL)
            libc.mallopt(_M_TRIM_THRESHOLD, _GLIBC_INITIAL)
            libc.malloc_trim(0)


__all__ = ["reuse_freed_memory"]
