"""Spectral kernels of the merge: truncated SVDs, EnchTable's interference, TSV's orthogonalisation.

All in float32 whatever the stored dtype. Interference of two deltas (DESIGN §3): keep the top
k_i = ⌊γ·min(m, n)⌋ singular triplets of each, stack U = [U1 U2], S, V = [V1 V2], and
    R = (UᵀU − I) diag(S) (VᵀV − I),   ι = scale · Σ|R_ij| / r²,   r = k1 + k2.
Each Ui has orthonormal columns, so UᵀU − I = [[0, A], [Aᵀ, 0]] with A = U1ᵀU2 (likewise B = V1ᵀV2)
and R is block-diagonal: R = diag(A S2 Bᵀ, Aᵀ S1 B). `interference` uses that form; the direct
product is kept as `interference_direct` for tests.
Triplets whose singular value is numerically zero are dropped from both (`significant`): r counts
the others, so a low-rank delta's ι does not depend on how its null space was completed.
"""

from __future__ import annotations

import functools
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


_GRAM_ROWS = 512  # rows of X converted to float64 at a time when forming its float64 Gram matrix
_GRAM_COLUMN_BLOCKS = 4  # column blocks of the Gram matrix: only the lower ones are multiplied (10 of 16)
_GRAM_MIN_BLOCK = 128  # columns per block at least: narrower products lose more speed than they save flops


def _gram(a: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """aᵀa in `dtype`, symmetric by construction: the columns in up to `_GRAM_COLUMN_BLOCKS` blocks, each block
    product below the diagonal computed once and mirrored above it (on CPU at 576 and 4096 columns 0.5–0.7× the
    time of the whole product, DESIGN.md); a converted `_GRAM_ROWS` rows at a time when the rows divide evenly (an
    8B layer's 14336×4096 in float64 at once would be 470 MB more per decomposition running)."""
    m, n = a.shape
    count = max(1, min(_GRAM_COLUMN_BLOCKS, n // _GRAM_MIN_BLOCK))
    edges = [round(i * n / count) for i in range(count + 1)]
    pairs = [(i, j) for i in range(count) for j in range(i + 1)]

    def lower(rows: jax.Array) -> tuple[jax.Array, ...]:  # the block products of rows' aᵀa on and below the diagonal
        wide = rows.astype(dtype)
        cols = [wide[:, edges[i]:edges[i + 1]] for i in range(count)]
        return tuple(cols[i].T @ cols[j] for i, j in pairs)

    if m <= _GRAM_ROWS or m % _GRAM_ROWS:
        products = lower(a)
    else:
        blocks = a.reshape(m // _GRAM_ROWS, _GRAM_ROWS, n)

        def add(total, block):
            return tuple(t + p for t, p in zip(total, lower(block))), None

        # Begun from the first block, not from zeros: inside shard_map the sum must vary over the mesh as the blocks
        # do.
        products = jax.lax.scan(add, lower(blocks[0]), blocks[1:])[0]
    block = dict(zip(pairs, products))
    return jnp.block([[block[i, j] if j <= i else block[j, i].T for j in range(count)] for i in range(count)])


def gram_triplets(x: jax.Array, k: int, dtype: jnp.dtype = jnp.float32) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The leading k singular triplets from the eigendecomposition of the smaller Gram matrix, formed and decomposed
    in `dtype`.

    For m ≥ n: XᵀX = V S² Vᵀ, U = X V / S (and the transpose for wide X). In float32 the Gram matrix squares the
    condition number: the triplets are accurate to about ε·(σ1/σk)² relative, fine while the kept part of the
    spectrum spans a few orders of magnitude. In float64 (scoped to this computation: `jax.enable_x64`) that error
    is ε64·(σ1/σk)², below float32's own rounding until σ1/σk passes 10⁴, so V and S are as accurate as the float32
    SVD's, and U = XV/S in float32 as accurate as its U: on CPU it takes 0.57–1.0× the SVD's time (DESIGN.md, "SVD
    solvers per backend"). Returned in float32.
    """
    wide = x.shape[0] < x.shape[1]
    a = (x.T if wide else x).astype(jnp.float32)  # tall
    with jax.enable_x64(dtype == jnp.float64):
        w, vecs = jnp.linalg.eigh(_gram(a, dtype))  # ascending
        v = vecs[:, ::-1][:, :k].astype(jnp.float32)
        s = jnp.sqrt(jnp.maximum(w[::-1][:k], 0.0)).astype(jnp.float32)
    u = (a @ v) / jnp.where(s > 0, s, 1.0)
    return (v, s, u) if wide else (u, s, v)


# Solvers of `top_triplets`. "svd" and "gram64" are exact to float32 (ι within 1e-4 relative of float64); "gram" trades
# accuracy for speed; "auto" is the platform's exact one (SOLVER_BY_PLATFORM, else "svd").
SOLVERS = ("auto", "svd", "gram64", "gram")
EXACT_SOLVERS = ("svd", "gram64")
# float64 where it is fast (CPU); GPUs run float64 at a fraction of float32's rate, TPUs not at all.
SOLVER_BY_PLATFORM = {"cpu": "gram64"}
Triplets = tuple[jax.Array, jax.Array, jax.Array]  # U [m, k], S [k] descending, V [n, k]


def _check_solver(solver: str) -> None:
    if solver not in SOLVERS:
        raise EnchtableError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")


def solver_for(solver: str, platform: str) -> str:
    """The solver that `solver` means on `platform` ("auto": SOLVER_BY_PLATFORM, else "svd"; others as given)."""
    _check_solver(solver)
    return SOLVER_BY_PLATFORM.get(platform, "svd") if solver == "auto" else solver


def top_triplets(x: jax.Array, keep: float, solver: str = "auto", known: Triplets | None = None,
                 algorithm: SvdAlgorithm | None = None) -> Triplets:
    """The leading ⌊keep · min(m, n)⌋ singular triplets of x, by `solver` (`SOLVERS`; "auto" chooses by the platform
    the computation is lowered for).

    `known`: x's leading triplets computed before (a cache, or the factors of a low-rank x), at least as many as
    kept, or fewer when x has lower rank; they are sliced instead of decomposing x again. `algorithm`: the thin
    SVD's (`thin_svd`; None: the platform's, from SVD_ALGORITHMS).
    """
    k = kept(x.shape, keep)
    if known is not None:
        u, s, v = known
        return u[:, :k], s[:k], v[:, :k]
    if solver == "auto":
        by_platform = {platform: functools.partial(top_triplets, keep=keep, solver=chosen, algorithm=algorithm)
                       for platform, chosen in SOLVER_BY_PLATFORM.items()}
        return jax.lax.platform_dependent(x, default=functools.partial(top_triplets, keep=keep, solver="svd",
                                                                       algorithm=algorithm), **by_platform)
    if solver in ("gram", "gram64"):
        return gram_triplets(x, k, jnp.float64 if solver == "gram64" else jnp.float32)
    _check_solver(solver)
    u, s, v = thin_svd(x, algorithm)
    return u[:, :k], s[:k], v[:, :k]


def significant(triplets: Triplets, shape: tuple[int, ...]) -> Triplets:
    """The triplets with the numerically zero ones zeroed: σ ≤ max(m, n)·ε·σ1 (numpy's matrix_rank tolerance).

    Singular vectors of a zero singular value are any orthonormal completion, so they must not enter ι: without
    this, a rank-r delta's interference would depend on the basis LAPACK happened to pick for its null space,
    and its dense and factored (LoRA) decompositions would disagree.
    """
    u, s, v = triplets
    live = s > s[0] * max(shape) * jnp.finfo(jnp.float32).eps
    return u * live, jnp.where(live, s, 0.0), v * live


def interference_blocks(u1, s1, v1, u2, s2, v2) -> jax.Array:
    """Σ|R_ij| through the block-diagonal form: |A S2 Bᵀ| and |Aᵀ S1 B| only."""
    a = u1.T @ u2
    b = v1.T @ v2
    return jnp.sum(jnp.abs((a * s2) @ b.T)) + jnp.sum(jnp.abs((a.T * s1) @ b))


def interference_terms(task: jax.Array, safety: jax.Array, keep: float = DEFAULT_KEEP, solver: str = "auto",
                       known: dict[str, Triplets] | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(P, Q, r) with P = Σ|A S2 Bᵀ|, Q = Σ|Aᵀ S1 B| and r = k1 + k2, so that ι = scale·(P + Q)/r².

    k1 and k2 count the kept triplets that are not numerically zero (`significant`). Scaling the safety delta by
    c > 0 keeps its singular vectors and multiplies S2 by c, so ι of (task, c·safety) is scale·(c·P + Q)/r²: one
    pair of decompositions gives ι for every strength (a calibration sweep, the learnable variant). `known`
    holds precomputed triplets by role ("task", "safety"; `top_triplets`).
    """
    known = known or {}
    u1, s1, v1 = significant(top_triplets(task, keep, solver, known.get("task")), task.shape)
    u2, s2, v2 = significant(top_triplets(safety, keep, solver, known.get("safety")), safety.shape)
    a = u1.T @ u2
    b = v1.T @ v2
    r = jnp.count_nonzero(s1) + jnp.count_nonzero(s2)
    return jnp.sum(jnp.abs((a * s2) @ b.T)), jnp.sum(jnp.abs((a.T * s1) @ b)), r


def interference(task: jax.Array, safety: jax.Array, keep: float = DEFAULT_KEEP, scale: float = DEFAULT_SCALE,
                 solver: str = "auto", known: dict[str, Triplets] | None = None) -> jax.Array:
    """EnchTable interference ι of two same-shaped 2-D deltas (the safety one already scaled by α, and so are the
    "safety" triplets in `known`); 0 when both deltas are zero."""
    p, q, r = interference_terms(task, safety, keep, solver, known)
    return scale * (p + q) / jnp.maximum(r, 1) ** 2


def interference_direct(task: jax.Array, safety: jax.Array, keep: float = DEFAULT_KEEP,
                        scale: float = DEFAULT_SCALE) -> jax.Array:
    """ι from the full r×r product (UᵀU − I) diag(S) (VᵀV − I): the reference for `interference`."""
    u1, s1, v1 = significant(top_triplets(task, keep), task.shape)
    u2, s2, v2 = significant(top_triplets(safety, keep), safety.shape)
    live = jnp.concatenate([s1, s2]) > 0
    u, s, v = jnp.concatenate([u1, u2], 1), jnp.concatenate([s1, s2]), jnp.concatenate([v1, v2], 1)
    eye = jnp.diag(live.astype(jnp.float32))  # the identity on the live triplets (the zeroed ones are not in R)
    residual = (u.T @ u - eye) @ jnp.diag(s) @ (v.T @ v - eye)
    r = jnp.count_nonzero(live)
    return scale * jnp.sum(jnp.abs(residual)) / jnp.maximum(r, 1) ** 2


def polar(x: jax.Array) -> jax.Array:
    """The orthogonal polar factor P Qᵀ of x = P Σ Qᵀ (nearest matrix with orthonormal columns)."""
    p, _, qt = jnp.linalg.svd(x.astype(jnp.float32), full_matrices=False)
    return p @ qt


__all__ = ["EXACT_SOLVERS", "SOLVERS", "SOLVER_BY_PLATFORM", "SVD_ALGORITHMS", "Triplets", "gram_triplets",
           "interference", "interference_direct", "interference_terms", "kept", "polar", "significant", "solver_for",
           "svd_algorithm", "thin_svd", "top_triplets"]
