"""Threads of the CPU LAPACK behind jaxlib's decompositions, and CPU devices for concurrent work.

jaxlib's CPU SVD/eigh call scipy's OpenBLAS, whose worker threads spin while they wait. One SVD at a
time on all cores scales poorly, and when other work competes for the cores the spinning threads
collapse (measured on a 2-core machine at load 5: a 1536×576 SVD 15× slower). XLA runs the programs
of several CPU devices concurrently (and those of one device one after the other, even when dispatched
from several Python threads: measured), so the merge does better with one CPU device per core and
single-threaded LAPACK in each. `import enchtable_jax` asks JAX for that (`use_every_core`) unless the
user chose a count or JAX has already started; training keeps one CPU device (`training_devices`), as
its one program already spreads over the cores (DESIGN.md, "CPU devices from Python").
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator

import jax
from threadpoolctl import ThreadpoolController

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
_ADDED_CPU_DEVICES: list[int] = []  # the count `use_every_core` set in this process, if it did (at most once)


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


def core_count() -> int:
    """Cores this process may run on (its CPU affinity where the platform says, else every core)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _count_chosen() -> bool:
    """Whether the user chose the CPU device count: XLA_FLAGS, or jax_num_cpu_devices (JAX_NUM_CPU_DEVICES)."""
    return DEVICE_COUNT_FLAG in os.environ.get("XLA_FLAGS", "") or jax.config.jax_num_cpu_devices != -1


def _backend_started() -> bool:
    """Whether JAX has created its devices (after that, the CPU device count is fixed)."""
    from jax._src import xla_bridge  # no public equivalent yet

    return xla_bridge.backends_are_initialized()


def use_every_core() -> int | None:
    """Ask JAX for one CPU device per core (`jax_num_cpu_devices`); returns the count, or None when nothing was set
    (one core, a count the user chose, or JAX already started: its devices cannot change any more)."""
    cores = core_count()
    if cores < 2 or _count_chosen() or _backend_started():
        return None
    jax.config.update("jax_num_cpu_devices", cores)
    _ADDED_CPU_DEVICES.append(cores)
    return cores


def training_devices() -> list[jax.Device]:
    """The devices a training mesh spans by default: all of them, except the CPU devices `use_every_core` added,
    which share the cores the training step already uses (measured: 0.92× the speed and 1.5× the memory on two)."""
    devices = jax.devices()
    if _ADDED_CPU_DEVICES and devices[0].platform == "cpu":
        return devices[:1]
    return devices


def warn_if_one_core_used(devices: list[jax.Device]) -> None:
    """Warn when the merge's decompositions will run on one CPU device of a multi-core machine (JAX was started
    before enchtable_jax was imported, so it could not add one device per core)."""
    cores = core_count()
    if len(devices) == 1 and devices[0].platform == "cpu" and cores > 1 and not _count_chosen():
        warnings.warn(f"the merge runs on 1 CPU device and uses 1 of {cores} cores: JAX had started before "
                      f"enchtable_jax was imported; import enchtable_jax (or call jax.config.update("
                      f"'jax_num_cpu_devices', {cores})) before the first JAX operation, e.g. in a fresh kernel",
                      stacklevel=3)


__all__ = ["blas_threads", "core_count", "training_devices", "use_every_core", "warn_if_one_core_used"]
