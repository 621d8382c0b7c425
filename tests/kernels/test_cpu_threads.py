"""CPU LAPACK threads are limited inside the block and restored after; the device-count flag is added once."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from enchtable_jax.kernels.cpu_threads import DEVICE_COUNT_FLAG, _loaded_openblas, blas_threads, with_cpu_devices


def test_blas_threads_limits_then_restores():
    jnp.linalg.svd(jnp.ones((4, 4)))  # jaxlib's LAPACK (scipy's OpenBLAS) is loaded
    libraries = _loaded_openblas()
    if not libraries:
        pytest.skip("no OpenBLAS loaded in this process (not Linux, or another LAPACK)")
    before = [get() for _, get in libraries]
    with blas_threads(1) as limited:
        assert limited == len(libraries)
        assert [get() for _, get in libraries] == [1] * len(libraries)
    assert [get() for _, get in libraries] == before


def test_device_flag_is_added_unless_chosen():
    assert with_cpu_devices("", 3) == f"{DEVICE_COUNT_FLAG}=3"
    assert with_cpu_devices("--xla_dump_to=/tmp/x", 2) == f"--xla_dump_to=/tmp/x {DEVICE_COUNT_FLAG}=2"
    chosen = f"{DEVICE_COUNT_FLAG}=8"
    assert with_cpu_devices(chosen, 2) == chosen
