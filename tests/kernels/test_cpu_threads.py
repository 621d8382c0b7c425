"""CPU LAPACK threads are limited inside the block and restored after; importing the package gives JAX one CPU device
per core unless a count was chosen or JAX had started, training keeps one, and a one-device merge warns."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from threadpoolctl import threadpool_info

from enchtable_jax.kernels.cpu_threads import DEVICE_COUNT_FLAG, blas_threads


def openblas_threads() -> dict[str, int]:
    """Threads of every OpenBLAS loaded in this process, by file, as the libraries report them."""
    return {i["filepath"]: i["num_threads"] for i in threadpool_info() if i["internal_api"] == "openblas"}


def test_blas_threads_limits_then_restores():
    with blas_threads(1):  # loads scipy's OpenBLAS, the one jaxlib calls
        pass
    before = openblas_threads()
    if not before:
        pytest.skip("no OpenBLAS loaded in this process (another LAPACK)")
    with blas_threads(1) as limited:
        assert limited == len(before)
        assert openblas_threads() == dict.fromkeys(before, 1)
    assert openblas_threads() == before


def _fresh(code: str, **env: str) -> list[str]:
    """The words a fresh Python prints, with no device count chosen in its environment but the `env` given."""
    clean = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True,
                          env={**clean, **env})
    return done.stdout.split()


CORES = len(os.sched_getaffinity(0))
_COUNTS = ("from enchtable_jax.kernels.mesh import make_mesh; "
           "print(jax.device_count(), make_mesh().devices.size)")


@pytest.mark.skipif(CORES < 2, reason="one core: nothing to add")
def test_importing_the_package_gives_one_cpu_device_per_core_and_training_one():
    assert _fresh("import jax; import enchtable_jax; " + _COUNTS) == [str(CORES), "1"]  # as a notebook imports


@pytest.mark.slow  # three fresh processes, ~10 s
def test_a_count_the_user_chose_or_a_started_jax_is_kept():
    assert _fresh("import enchtable_jax, jax; " + _COUNTS, XLA_FLAGS=f"{DEVICE_COUNT_FLAG}=3") == ["3", "3"]
    assert _fresh("import enchtable_jax, jax; " + _COUNTS, JAX_NUM_CPU_DEVICES="3") == ["3", "3"]
    warned = ("import jax, warnings; jax.devices(); import enchtable_jax\n"
              "from enchtable_jax.merging.executor import merge_mesh\n"
              "with warnings.catch_warnings(record=True) as w:\n"
              "    warnings.simplefilter('always'); merge_mesh()\n"
              "print(jax.device_count(), len(w))")
    assert _fresh(warned) == ["1", "1" if CORES > 1 else "0"]


_FRESH = """
import json
import jax.numpy as jnp
from threadpoolctl import threadpool_info
from enchtable_jax.kernels.cpu_threads import blas_threads


def openblas_names():
    return sorted({line.split()[-1] for line in open("/proc/self/maps") if "openblas" in line.rsplit("/", 1)[-1]})


with blas_threads(1):  # before JAX has compiled any decomposition
    inside = openblas_names()
    threads = [i["num_threads"] for i in threadpool_info() if i["internal_api"] == "openblas"]
jnp.linalg.svd(jnp.ones((4, 4))).S.block_until_ready()  # now jaxlib's LAPACK is certainly loaded
print(json.dumps({"inside": inside, "after": openblas_names(), "threads": threads}))
"""


def test_a_fresh_process_limits_the_lapack_jax_calls():
    """jaxlib's LAPACK (scipy's OpenBLAS) loads lazily: blas_threads must reach it in a fresh process too."""
    done = subprocess.run([sys.executable, "-c", _FRESH], capture_output=True, text=True, timeout=120, check=True)
    got = json.loads(done.stdout.strip().splitlines()[-1])
    if not got["after"]:
        pytest.skip("no OpenBLAS in this environment")
    assert set(got["after"]) <= set(got["inside"])  # every OpenBLAS that JAX uses was limited
    assert got["threads"] and set(got["threads"]) == {1}
