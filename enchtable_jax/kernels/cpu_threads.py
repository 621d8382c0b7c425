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
import os
from collections.abc import Iterator

from threadpoolctl import ThreadpoolController

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


@contextlib.contextmanager
def blas_threads(n: int) -> Iterator[int]:
    """Run the block with every loaded OpenBLAS limited to n threads (process-wide), then restore them.

    Yields how many libraries were limited (0 where none is found: the block runs unchanged). jaxlib's LAPACK
    is scipy's OpenBLAS, loaded on the first decomposition JAX compiles: it is loaded here first, or a fresh
    process would limit numpy's OpenBLAS only.
    """
    with contextlib.suppress(ImportError):
        import scipy.linalg.cython_lapack  # noqa: F401 - loads the library jaxlib calls
    openblas = ThreadpoolController().select(internal_api="openblas")
    with openblas.limit(limits=n):
        yield len(openblas.lib_controllers)


def with_cpu_devices(flags: str, count: int | None = None) -> str:
    """XLA_FLAGS with one host (CPU) device per core added, unless the flags already choose a count."""
    if DEVICE_COUNT_FLAG in flags:
        return flags
    return f"{flags} {DEVICE_COUNT_FLAG}={count or os.cpu_count() or 1}".strip()


__all__ = ["blas_threads", "with_cpu_devices"]
