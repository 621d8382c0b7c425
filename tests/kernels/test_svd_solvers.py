"""SVD algorithms per platform (kernels/spectral.py `SVD_ALGORITHMS`) and solvers (`SOLVERS`): every algorithm this
CPU can run, and every exact solver (the float32 SVD, the float64 Gram eigendecomposition, "auto"), keeps
EnchTable's interference within 1e-4 relative of a float64 numpy computation; `thin_svd` follows the table, "auto"
the platform's solver.

Spectra like a fine-tuning delta's (decaying as 1/i and exp(−i/30)), tall and wide, float32 inputs; the oracle is
the direct r×r formula on float64 numpy SVDs of the same (float32-rounded) matrices (`oracles.iota64`).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.lax.linalg import SvdAlgorithm

from oracles import iota64

from enchtable_jax.kernels.spectral import EXACT_SOLVERS, SVD_ALGORITHMS, interference_blocks, solver_for, \
    svd_algorithm, thin_svd, top_triplets

KEEP, SCALE = 0.5, 200.0
CPU_ALGORITHMS = (SvdAlgorithm.DEFAULT, SvdAlgorithm.QR, SvdAlgorithm.DIVIDE_AND_CONQUER)  # JACOBI, POLAR: GPU only


def spectrum_matrix(shape: tuple[int, int], decay: str, seed: int) -> np.ndarray:
    """float32 U diag(σ) Vᵀ with random orthonormal U, V and σ_i = 1/i or exp(−i/30)."""
    rng = np.random.default_rng(seed)
    n = min(shape)
    u = np.linalg.qr(rng.standard_normal((shape[0], n)))[0]
    v = np.linalg.qr(rng.standard_normal((shape[1], n)))[0]
    i = np.arange(1, n + 1)
    sigma = 1.0 / i if decay == "1/i" else np.exp(-i / (3.0 if decay == "steep" else 30.0))
    return ((u * sigma) @ v.T).astype(np.float32)


def iota_with(algorithm: SvdAlgorithm | None, task: np.ndarray, safety: np.ndarray) -> float:
    """Our float32 ι from `thin_svd(·, algorithm)` and the block formula."""
    @jax.jit
    def iota(a, b):
        (u1, s1, v1), (u2, s2, v2) = (top_triplets(x, KEEP, algorithm=algorithm) for x in (a, b))
        return SCALE * interference_blocks(u1, s1, v1, u2, s2, v2) / (s1.size + s2.size) ** 2

    return float(iota(task, safety))


@pytest.mark.parametrize("algorithm", [None, *CPU_ALGORITHMS], ids=lambda a: "table" if a is None else a.name)
@pytest.mark.parametrize("shape", [(96, 64), (48, 120)], ids=["tall", "wide"])
@pytest.mark.parametrize("decay", ["1/i", "exp"])
def test_every_cpu_algorithm_keeps_the_float32_bound(algorithm, shape, decay):
    task = spectrum_matrix(shape, decay, seed=1)
    safety = 0.3 * spectrum_matrix(shape, decay, seed=2) + 0.2 * task  # overlapping subspaces: ι well above zero
    expected = iota64(task, safety, KEEP, SCALE)  # full-rank spectra: no triplet is dropped as zero
    assert expected > 1e-3
    assert abs(iota_with(algorithm, task, safety) - expected) <= 1e-4 * expected


def iota_by(solver: str, task: np.ndarray, safety: np.ndarray) -> float:
    """Our float32 ι from `top_triplets(·, solver=solver)` and the block formula."""
    @jax.jit
    def iota(a, b):
        (u1, s1, v1), (u2, s2, v2) = (top_triplets(x, KEEP, solver) for x in (a, b))
        return SCALE * interference_blocks(u1, s1, v1, u2, s2, v2) / (s1.size + s2.size) ** 2

    return float(iota(task, safety))


@pytest.mark.parametrize("solver", [*EXACT_SOLVERS, "gram"])  # "auto": gram64 here (test_auto_is_the_platforms_solver)
@pytest.mark.parametrize("shape", [(96, 64), (48, 120), (1024, 48)], ids=["tall", "wide", "Gram by row blocks"])
@pytest.mark.parametrize("decay", ["1/i", "steep"])  # σ_k/σ_1 at the last kept triplet: 1/32, 2e-5 (tall)
def test_every_exact_solver_keeps_the_float32_bound(solver, shape, decay):
    """The float64 Gram eigendecomposition ("gram64", CPU's "auto") is as accurate as the float32 SVD even where
    the spectrum spans orders of magnitude; the float32 one ("gram") is not, which is why it is not exact."""
    task = spectrum_matrix(shape, decay, seed=1)
    safety = 0.3 * spectrum_matrix(shape, decay, seed=2) + 0.2 * task
    expected = iota64(task, safety, KEEP, SCALE)
    error = abs(iota_by(solver, task, safety) - expected) / expected
    if solver == "gram" and decay == "steep":
        assert error > 1e-4
    else:
        assert error <= 1e-4, error


def test_gram64_by_row_blocks_runs_inside_the_merges_shard_map():
    """The merge maps `top_triplets` over a group with shard_map (executor.py); the Gram matrix's row-block sum must
    trace there too, and give what it gives outside."""
    from jax.sharding import PartitionSpec as P

    from enchtable_jax.merging.executor import GROUP_AXIS, merge_mesh

    mesh = merge_mesh()
    stack = np.stack([spectrum_matrix((1024, 48), "1/i", seed=i) for i in range(mesh.size)])
    for x in (stack, stack.transpose(0, 2, 1)):  # tall and wide
        mapped = jax.jit(jax.shard_map(lambda x: jax.lax.map(lambda a: top_triplets(a, KEEP, "gram64"), x),
                                       mesh=mesh, in_specs=P(GROUP_AXIS), out_specs=P(GROUP_AXIS)))(x)
        alone = jax.jit(lambda a: top_triplets(a, KEEP, "gram64"))(x[0])
        for got, want in zip(mapped, alone):
            np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_auto_is_the_platforms_solver():
    x = spectrum_matrix((80, 48), "1/i", seed=3)
    triplets = {s: [np.asarray(t) for t in jax.jit(lambda a, s=s: top_triplets(a, KEEP, s))(x)]
                for s in ("auto", "svd", "gram64")}
    assert solver_for("auto", "cpu") == "gram64" and solver_for("auto", "cuda") == solver_for("auto", "tpu") == "svd"
    assert all(np.array_equal(a, b) for a, b in zip(triplets["auto"], triplets["gram64"]))
    assert not np.array_equal(triplets["auto"][0], triplets["svd"][0])


def test_the_table_chooses_by_platform_and_shape():
    assert svd_algorithm("cpu", (14336, 4096)) == SvdAlgorithm.DIVIDE_AND_CONQUER
    assert svd_algorithm("cuda", (576, 576)) == svd_algorithm("cuda", (14336, 4096)) == SvdAlgorithm.POLAR
    assert svd_algorithm("tpu", (4096, 4096)) == SvdAlgorithm.DEFAULT
    assert svd_algorithm("metal", (8, 8)) == SvdAlgorithm.DEFAULT  # a platform the table does not know


def test_thin_svd_runs_the_table_entry_of_the_platform_it_is_lowered_for(monkeypatch):
    """Without an explicit algorithm the CPU lowering takes the table's CPU rule: rewritten to QR, the result is
    QR's bit for bit (gesvd and gesdd differ in the last bits)."""
    x = spectrum_matrix((80, 48), "1/i", seed=3)
    by_algorithm = {a: np.asarray(jax.jit(thin_svd, static_argnums=1)(x, a)[1]) for a in
                    (SvdAlgorithm.QR, SvdAlgorithm.DIVIDE_AND_CONQUER)}
    assert not np.array_equal(*by_algorithm.values())
    for algorithm, singular_values in by_algorithm.items():
        monkeypatch.setitem(SVD_ALGORITHMS, "cpu", ((None, algorithm),))
        fresh = jax.jit(lambda a: thin_svd(a)[1])  # a new function: traced again under the patched table
        np.testing.assert_array_equal(np.asarray(fresh(x)), singular_values)


@pytest.mark.parametrize("shape", [(300, 256), (1024, 400), (1536, 576)], ids=["two blocks", "rows and uneven columns",
                                                                             "rows and four blocks"])
def test_gram_from_lower_blocks_equals_the_float64_product(shape):
    """gram64's Gram matrix, multiplied block by block below the diagonal (and by row blocks), is numpy's float64
    aᵀa of the float32 input."""
    from enchtable_jax.kernels.spectral import _gram

    a = spectrum_matrix(shape, "1/i", seed=3)
    with jax.enable_x64(True):
        got = np.asarray(jax.jit(lambda x: _gram(x, np.float64))(a))
    wide = a.astype(np.float64)
    np.testing.assert_allclose(got, wide.T @ wide, rtol=1e-12, atol=1e-15)
