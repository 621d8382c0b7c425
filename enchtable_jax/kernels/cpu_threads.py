"""Threads of the CPU LAPACK behind jaxlib's decompositions, and CPU devices for concurrent work.

jaxlib's CPU SVD/eigh call scipy's OpenBLAS, whose worker threads spin while they wait. One SVD at a
time on all cores scales poorly, and when other work competes for the cores the spinning threads
collapse (measured on a 2-core machine at load 5: a 1536×576 SVD 15× slower). XLA runs the programs
of several CPU devices concurrently, so the merge does better with one CPU device per core and
single-threaded LAPACK in each (`enchtable merge` sets that up; library users start Python with
`XLA_FLAGS=--xla_force_host_platform_device_count=<cores>`).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
# (set, get) symbol pairs of the OpenBLAS builds we know: scipy's and numpy's wheels rename theirs.
_SYMBOLS = (("scipy_openblas_set_num_threads", "scipy_openblas_get_num_threads"),
            ("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),
            ("openblas_set_num_threads", "openblas_get_num_threads"))


def _loaded_openblas() -> list[tuple]:
    """(set, get) functions of every OpenBLAS loaded in this process (Linux; elsewhere none).

    jaxlib's LAPACK is scipy's, loaded on the first decomposition JAX compiles: it is loaded here first,
    or a fresh process would limit numpy's OpenBLAS only.
    """
    with contextlib.suppress(ImportError):
        import scipy.linalg.cython_lapack  # noqa: F401 - loads the library jaxlib calls
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.rsplit("/", 1)[-1].lower()}
    except OSError:
        return []
    found = []
    for path in sorted(p for p in paths if p.startswith("/")):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for set_name, get_name in _SYMBOLS:
            if hasattr(lib, set_name) and hasattr(lib, get_name):
                found.append((getattr(lib, set_name), getattr(lib, get_name)))
                break
    return found


@contextlib.contextmanager
def blas_threads(n: int) -> Iterator[int]:
    """Run the block with every loaded OpenBLAS limited to n threads (process-wide), then restore them.

    Yields how many libraries were limited (0 where none is found: the block runs unchanged).
    """
    libraries = _loaded_openblas()
    saved = [(set_threads, get_threads()) for set_threads, get_threads in libraries]
    for set_threads, _ in saved:
        set_threads(n)
    try:
        yield len(saved)
    finally:
        for set_threads, previous in saved:
            set_threads(previous)


def with_cpu_devices(flags: str, count: int | None = None) -> str:
    """XLA_FLAGS with one host (CPU) device per core added, unless the flags already choose a count."""
    if DEVICE_COUNT_FLAG in flags:
        return flags
    return f"{flags} {DEVICE_COUNT_FLAG}={count or os.cpu_count() or 1}".strip()


__all__ = ["blas_threads", "with_cpu_devices"]
