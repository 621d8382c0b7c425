"""Spectral facts of a low-rank delta B·A (a LoRA task vector) computed from its factors, never from B·A.

B [m, r] and A [r, n] with r ≪ m, n: QR of B = Q_B R_B and of Aᵀ = Q_A R_A give B·A = Q_B (R_B R_Aᵀ) Q_Aᵀ, so
the SVD of the r×r core R_B R_Aᵀ = W S Zᵀ yields B·A's thin SVD U = Q_B W, S, V = Q_A Z: O((m + n)·r²) flops
instead of the O(m·n·min(m, n)) of an SVD of the dense product. ‖B·A‖²_F = trace((BᵀB)(AAᵀ)) likewise needs
only r×r products.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def factored_triplets(b: jax.Array, a: jax.Array, k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The top min(k, r) singular triplets of B·A (U [m, k'], S [k'] descending, V [n, k'], float32, as
    kernels/spectral.py returns them) from QR of the factors and an SVD of their r×r core. `k` is static."""
    b, a = b.astype(jnp.float32), a.astype(jnp.float32)
    qb, rb = jnp.linalg.qr(b)
    qa, ra = jnp.linalg.qr(a.T)
    w, s, zt = jnp.linalg.svd(rb @ ra.T, full_matrices=False)
    k = min(k, s.shape[0])
    return qb @ w[:, :k], s[:k], qa @ zt[:k].T


def factored_sq_norm(b, a):
    """‖B·A‖²_F = Σ (BᵀB) ⊙ (AAᵀ) (both symmetric), in the factors' own precision and array library: numpy
    float64 on the host for the adaptive α's global norm, jax inside a merge."""
    return ((b.T @ b) * (a @ a.T)).sum()


__all__ = ["factored_sq_norm", "factored_triplets"]
