"""CPU LAPACK threads are limited inside the block and restored after; the device-count flag is added once."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from threadpoolctl import threadpool_info

from enchtable_jax.kernels.cpu_threads import DEVICE_COUNT_FLAG, blas_threads, with_cpu_devices


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


def test_device_flag_is_added_unless_chosen():
    assert with_cpu_devices("", 3) == f"{DEVICE_COUNT_FLAG}=3"
    assert with_cpu_devices("--xla_dump_to=/tmp/x", 2) == f"--xla_dump_to=/tmp/x {DEVICE_COUNT_FLAG}=2"
    chosen = f"{DEVICE_COUNT_FLAG}=8"
    assert with_cpu_devices(chosen, 2) == chosen


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
