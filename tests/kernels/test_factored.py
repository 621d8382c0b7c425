"""Low-rank spectral kernels against float64 numpy on the dense product B·A: the singular triplets from the
factors' QR and r×r SVD, and ‖B·A‖² from r×r products."""

from __future__ import annotations

import chex
import jax
import numpy as np
import pytest

from enchtable_jax.kernels.factored import factored_sq_norm, factored_triplets


def factors(m: int, n: int, r: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((m, r)).astype(np.float32), rng.standard_normal((r, n)).astype(np.float32)


def aligned(u: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """`u`'s columns with signs flipped to match `ref` (singular vectors are defined up to sign)."""
    return u * np.sign(np.sum(u * ref, axis=0))


@pytest.mark.parametrize("m, n, r, k", [(48, 32, 4, 4), (32, 48, 6, 3), (40, 40, 5, 9), (3, 20, 5, 5)])
def test_triplets_equal_the_svd_of_the_product(m, n, r, k):
    b, a = factors(m, n, r)
    dense = b.astype(np.float64) @ a.astype(np.float64)
    u_ref, s_ref, vt_ref = np.linalg.svd(dense, full_matrices=False)
    kk = min(k, r, m, n)
    u, s, v = (np.asarray(x, np.float64) for x in jax.jit(factored_triplets, static_argnums=2)(b, a, k))
    assert u.shape == (m, kk) and s.shape == (kk,) and v.shape == (n, kk)
    assert np.all(np.diff(s) <= 0)
    np.testing.assert_allclose(s, s_ref[:kk], rtol=1e-5)
    np.testing.assert_allclose(aligned(u, u_ref[:, :kk]), u_ref[:, :kk], atol=1e-4)
    np.testing.assert_allclose(aligned(v, vt_ref[:kk].T), vt_ref[:kk].T, atol=1e-4)
    np.testing.assert_allclose((u * s) @ v.T, dense if kk == min(r, m, n) else (u_ref[:, :kk] * s_ref[:kk])
                               @ vt_ref[:kk], atol=1e-4 * np.abs(dense).max())


def test_triplets_of_a_rank_deficient_product_span_its_range():
    b, a = factors(30, 20, 4)
    b[:, 3] = b[:, 0]  # B·A has rank 3 though r = 4
    u, s, v = (np.asarray(x, np.float64) for x in factored_triplets(b, a, 4))
    s_ref = np.linalg.svd(b.astype(np.float64) @ a, compute_uv=False)
    np.testing.assert_allclose(s, s_ref[:4], atol=1e-4 * s_ref[0])
    np.testing.assert_allclose(u.T @ u, np.eye(4), atol=1e-5)  # orthonormal columns even for the zero triplet


@pytest.mark.parametrize("m, n, r", [(48, 32, 4), (20, 64, 8)])
def test_squared_norm_from_factors(m, n, r):
    b, a = factors(m, n, r, seed=1)
    expected = np.sum((b.astype(np.float64) @ a.astype(np.float64)) ** 2)
    np.testing.assert_allclose(factored_sq_norm(b.astype(np.float64), a.astype(np.float64)), expected, rtol=1e-12)
    np.testing.assert_allclose(float(jax.jit(factored_sq_norm)(b, a)), expected, rtol=1e-5)
    chex.assert_shape(jax.jit(factored_sq_norm)(b, a), ())
