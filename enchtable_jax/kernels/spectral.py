"""Spectral kernels of the merge: truncated SVDs, EnchTable's interference, TSV's orthogonalisation.

All in float32 whatever the stored dtype. Interference of two deltas (DESIGN §3): keep the top
k_i = ⌊γ·min(m, n)⌋ singular triplets of each, stack U = [U1 U2], S, V = [V1 V2], and
    R = (UᵀU − I) diag(S) (VᵀV − I),   ι = scale · Σ|R_ij| / r²,   r = k1 + k2.
Each Ui has orthonormal columns, so UᵀU − I = [[0, A], [Aᵀ, 0]] with A = U1ᵀU2 (likewise B = V1ᵀV2)
and R is block-diagonal: R = diag(A S2 Bᵀ, Aᵀ S1 B). `interference` uses that form; the direct
product is kept as `interference_direct` for tests.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.lax.linalg import SvdAlgorithm

from enchtable_jax.errors import EnchtableError

DEFAULT_KEEP = 0.5
DEFAULT_SCALE = 200.0


# The SVD algorithm per platform (`jax.lax.platform_dependent`'s names), as rules (largest matrix side, algorithm)
# taken in order; None: any size. The reasons are in DESIGN.md, "SVD solvers per backend"; benchmarks/svd_algorithms.py
# (run by benchmarks/device_check.sh) measures the GPU's choices.
SVD_ALGORITHMS: dict[str, tuple[tuple[int | None, SvdAlgorithm], ...]] = {
    "cpu": ((None, SvdAlgorithm.DIVIDE_AND_CONQUER),),  # LAPACK gesdd
    "cuda": ((None, SvdAlgorithm.POLAR),),  # cuSOLVER gesvdp (JAX's default: gesvdj up to 1024, then gesvd)
    "rocm": ((None, SvdAlgorithm.DEFAULT),),  # JAX's choice (not measured on ROCm)
    "tpu": ((None, SvdAlgorithm.DEFAULT),),  # QDWH polar decomposition, TPU's only SVD
}


def svd_algorithm(platform: str, shape: tuple[int, ...]) -> SvdAlgorithm:
    """The algorithm `thin_svd` uses on `platform` for a matrix of `shape` (SVD_ALGORITHMS; JAX's default elsewhere)."""
    for largest, algorithm in SVD_ALGORITHMS.get(platform, ()):
        if largest is None or max(shape) <= largest:
            return algorithm
    return SvdAlgorithm.DEFAULT


def thin_svd(x: jax.Array, algorithm: SvdAlgorithm | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """U [m, r], S [r], V [n, r] (r = min(m, n)), decomposing a wide matrix through its transpose.

    `algorithm`: None chooses by the platform the computation is lowered for and the shape (`svd_algorithm`);
    an explicit one is used on every platform (it must exist there: JACOBI and POLAR do not on CPU).
    """
    x = x.astype(jnp.float32)
    wide = x.shape[0] < x.shape[1]  # LAPACK is markedly faster on tall matrices
    tall = x.T if wide else x

    def solve(chosen: SvdAlgorithm) -> Callable[[jax.Array], tuple[jax.Array, jax.Array, jax.Array]]:
        return lambda a: jax.lax.linalg.svd(a, full_matrices=False, algorithm=chosen)

    if algorithm is not None:
        u, s, vt = solve(algorithm)(tall)
    else:
        per_platform = {platform: solve(svd_algorithm(platform, tall.shape)) for platform in SVD_ALGORITHMS}
        u, s, vt = jax.lax.platform_dependent(tall, default=solve(SvdAlgorithm.DEFAULT), **per_platform)
    return (vt.T, s, u) if wide else (u, s, vt.T)


def kept(shape: tuple[int, ...], keep: float) -> int:
    """Number of singular triplets kept for a matrix of `shape`: ⌊keep · min(m, n)⌋, at least 1."""
    return max(1, int(keep * min(shape)))


def gram_triplets(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The leading k singular triplets from the eigendecomposition of the smaller Gram matrix.

    For m ≥ n: XᵀX = V S² Vᵀ, U = X V / S (and the transpose for wide X). Several times faster than
    an SVD on CPU, but the Gram matrix squares the condition number: the triplets are accurate to
    about ε·(σ1/σk)² relative (float32 ε), fine while the kept part of the spectrum spans a few orders
    of magnitude; the `svd` solver has no such limit.
    """
    x = x.astype(jnp.float32)
    wide = x.shape[0] < x.shape[1]
    a = x.T if wide else x  # tall
    w, vecs = jnp.linalg.eigh(a.T @ a)  # ascending
    v = vecs[:, ::-1][:, :k]
    s = jnp.sqrt(jnp.maximum(w[::-1][:k], 0.0))
    u = (a @ v) / jnp.where(s > 0, s, 1.0)
    return (v, s, u) if wide else (u, s, v)


SOLVERS = ("svd", "gram")


def top_triplets(x: jax.Array, keep: float, solver: str = "svd") -> tuple[jax.Array, jax.Array, jax.Array]:
    """The leading ⌊keep · min(m, n)⌋ singular triplets of x, by a thin SVD or the Gram eigenproblem."""
    k = kept(x.shape, keep)
    if solver == "gram":
        return gram_triplets(x, k)
    if solver != "svd":
        raise EnchtableError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    u, s, v = thin_svd(x)
    return u[:, :k], s[:k], v[:, :k]


def interference_blocks(u1, s1, v1, u2, s2, v2) -> jax.Array:
    """Σ|R_ij| through the block-diagonal form: |A S2 Bᵀ| and |Aᵀ S1 B| only."""
    a = u1.T @ u2
    b = v1.T @ v2
    return jnp.sum(jnp.abs((a * s2) @ b.T)) + jnp.sum(jnp.abs((a.T * s1) @ b))


def interference_terms(task: jax.Array, safety: jax.Array, keep: float = DEFAULT_KEEP,
                       solver: str = "svd") -> tuple[jax.Array, jax.Array, int]:
    """(P, Q, r) with P = Σ|A S2 Bᵀ|, Q = Σ|Aᵀ S1 B| and r = k1 + k2, so that ι = scale·(P + Q)/r².

    Scaling the safety delta by c keeps its singular vectors and multiplies S2 by |c|, so ι of
    (task, c·safety) is scale·(|c|·P + Q)/r²: one pair of decompositions gives ι for every strength
    (a calibration sweep, the learnable variant).
    """
    u1, s1, v1 = top_triplets(task, keep, solver)
    u2, s2, v2 = top_triplets(safety, keep, solver)
    a = u1.T @ u2
    b = v1.T @ v2
    return jnp.sum(jnp.abs((a * s2) @ b.T)), jnp.sum(jnp.abs((a.T * s1) @ b)), s1.shape[0] + s2.shape[0]


def interference(task: jax.Array, safety: jax.Array, keep: float = DEFAULT_KEEP, scale: float = DEFAULT_SCALE,
                 solver: str = "svd") -> jax.Array:
    """EnchTable interference ι of two same-shaped 2-D deltas (the safety one already scaled by α)."""
    p, q, r = interference_terms(task, safety, keep, solver)
    return scale * (p + q) / r**2


def interference_direct(task: jax.Array, safety: jax.Array, keep: float = DEFAULT_KEEP,
                        scale: float = DEFAULT_SCALE) -> jax.Array:
    """ι from the full r×r product (UᵀU − I) diag(S) (VᵀV − I): the reference for `interference`."""
    u1, s1, v1 = top_triplets(task, keep)
    u2, s2, v2 = top_triplets(safety, keep)
    u, s, v = jnp.concatenate([u1, u2], 1), jnp.concatenate([s1, s2]), jnp.concatenate([v1, v2], 1)
    r = s.shape[0]
    eye = jnp.eye(r, dtype=jnp.float32)
    residual = (u.T @ u - eye) @ jnp.diag(s) @ (v.T @ v - eye)
    return scale * jnp.sum(jnp.abs(residual)) / r**2


def polar(x: jax.Array) -> jax.Array:
    """The orthogonal polar factor P Qᵀ of x = P Σ Qᵀ (nearest matrix with orthonormal columns)."""
    p, _, qt = jnp.linalg.svd(x.astype(jnp.float32), full_matrices=False)
    return p @ qt


__all__ = ["interference", "interference_direct", "interference_terms", "kept", "polar", "thin_svd", "top_triplets"]
