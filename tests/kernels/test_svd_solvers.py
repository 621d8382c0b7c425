"""SVD algorithms per platform (kernels/spectral.py `SVD_ALGORITHMS`): every algorithm this CPU can run keeps
EnchTable's interference within 1e-4 relative of a float64 numpy computation, and `thin_svd` follows the table.

Spectra like a fine-tuning delta's (decaying as 1/i and exp(−i/30)), tall and wide, float32 inputs; the oracle is
the direct r×r formula on float64 numpy SVDs of the same (float32-rounded) matrices (`oracles.iota64`).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.lax.linalg import SvdAlgorithm

from oracles import iota64

from enchtable_jax.kernels.spectral import SVD_ALGORITHMS, interference_blocks, svd_algorithm, thin_svd, \
    top_triplets

KEEP, SCALE = 0.5, 200.0
CPU_ALGORITHMS = (SvdAlgorithm.DEFAULT, SvdAlgorithm.QR, SvdAlgorithm.DIVIDE_AND_CONQUER)  # JACOBI, POLAR: GPU only


def spectrum_matrix(shape: tuple[int, int], decay: str, seed: int) -> np.ndarray:
    """float32 U diag(σ) Vᵀ with random orthonormal U, V and σ_i = 1/i or exp(−i/30)."""
    rng = np.random.default_rng(seed)
    n = min(shape)
    u = np.linalg.qr(rng.standard_normal((shape[0], n)))[0]
    v = np.linalg.qr(rng.standard_normal((shape[1], n)))[0]
    i = np.arange(1, n + 1)
    sigma = 1.0 / i if decay == "1/i" else np.exp(-i / 30.0)
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
