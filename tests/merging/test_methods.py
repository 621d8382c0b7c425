"""Merge methods against independent float64 numpy implementations of their formulas (DESIGN §3–§4).

Every oracle below is written from the formula (EnchTable, task arithmetic, TIES, DARE, Model
Breadcrumbs, Model Stock, TSV-Merge, Safe LoRA), not from the package code; the package runs in
float32 on float32 inputs, the oracle in float64 on the same (float32-rounded) values. Tolerance:
relative error ‖ours − oracle‖ / ‖oracle‖ ≤ 1e-5 unless a test says otherwise. Fixtures are built
with well-separated singular values at every kept index, so the float32 SVD is well conditioned and
the tolerance tests the formula rather than LAPACK.
"""

from __future__ import annotations

import inspect
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from enchtable_jax.kernels import spectral
from enchtable_jax.merging.methods import METHODS, _bernoulli_masks, _top_magnitude_mask, method_options

RTOL = 1e-5
SHAPES = [(24, 40), (40, 24), (32, 32), (48,)]
MATRIX_SHAPES = [s for s in SHAPES if len(s) == 2]
ALPHA = 0.7  # α ≠ 1 everywhere α is used
KEY = jax.random.key(0)


# ----------------------------------------------------------------------------------------------
# helpers


def f32(x) -> jax.Array:
    return jnp.asarray(np.asarray(x, np.float32))


def f64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def rel_err(actual, expected) -> float:
    actual, expected = f64(actual), f64(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    denom = np.linalg.norm(expected.ravel())
    return float(np.linalg.norm((actual - expected).ravel()) / (denom if denom > 0 else 1.0))


def assert_rel(actual, expected, tol=RTOL, what=""):
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e}"


def call(name, task, safety, alpha=ALPHA, key=KEY, **options):
    """Run a method on float32 jnp inputs; returns (delta, stats) as numpy."""
    delta, stats = METHODS[name].fn(f32(task), f32(safety), jnp.float32(alpha), key, **options)
    assert delta.dtype == jnp.float32 and delta.shape == np.shape(task)
    return np.asarray(delta), {k: float(v) for k, v in stats.items()}


def orthonormal(rng, m, r) -> np.ndarray:
    return np.linalg.qr(rng.standard_normal((m, r)))[0]


def spectrum(r: int, k: int) -> np.ndarray:
    """Singular values with clear gaps among the top k and a large gap after them."""
    top = np.linspace(1.0, 0.45, k)
    tail = 0.25 * np.linspace(1.0, 0.3, r - k) if r > k else np.zeros(0)
    return np.concatenate([top, tail])


def overlapping_pair(shape, seed, k, overlap=0.7):
    """(τ_task, τ_safe) rounded to float32, with τ_safe's singular vectors partly made of τ_task's.

    τ_task = U1 diag(s1) V1ᵀ and τ_safe = P diag(s2) Qᵀ where P, Q orthonormalise
    overlap·(U1, V1 with shuffled columns) + (1 − overlap)·noise: the leading subspaces overlap, so
    A = U1ᵀU2 and B = V1ᵀV2 are far from 0 and the interference ι is clearly nonzero.
    """
    rng = np.random.default_rng(seed)
    if len(shape) == 1:
        return (rng.standard_normal(shape).astype(np.float32),
                (0.5 * rng.standard_normal(shape)).astype(np.float32))
    m, n = shape
    r = min(m, n)
    u1, v1 = orthonormal(rng, m, r), orthonormal(rng, n, r)
    task = (u1 * spectrum(r, k)) @ v1.T
    perm = np.concatenate([rng.permutation(k), k + rng.permutation(r - k)])  # leading subspaces overlap
    p = np.linalg.qr(overlap * u1[:, perm] + (1 - overlap) * rng.standard_normal((m, r)) / math.sqrt(m))[0]
    q = np.linalg.qr(overlap * v1[:, perm] + (1 - overlap) * rng.standard_normal((n, r)) / math.sqrt(n))[0]
    safety = 1.3 * (p * spectrum(r, k)) @ q.T
    return task.astype(np.float32), safety.astype(np.float32)


def kept_count(shape, keep) -> int:
    return max(1, math.floor(keep * min(shape)))


# ----------------------------------------------------------------------------------------------
# numpy oracles (float64)


def np_top(x, keep):
    u, s, vt = np.linalg.svd(f64(x), full_matrices=False)
    k = kept_count(x.shape, keep)
    return u[:, :k], s[:k], vt[:k].T


def np_iota(task, safety_scaled, keep, scale):
    """ι = scale·Σ|R|/r², R = (UᵀU − I) diag(S) (VᵀV − I), the direct r×r product."""
    u1, s1, v1 = np_top(task, keep)
    u2, s2, v2 = np_top(safety_scaled, keep)
    u, s, v = np.hstack([u1, u2]), np.concatenate([s1, s2]), np.hstack([v1, v2])
    r = s.size
    eye = np.eye(r)
    residual = (u.T @ u - eye) @ np.diag(s) @ (v.T @ v - eye)
    return scale * np.abs(residual).sum() / r**2


def np_enchtable(task, safety, alpha, keep, scale):
    task, scaled = f64(task), alpha * f64(safety)
    if task.ndim != 2:
        return task + scaled, float("nan"), 1.0
    iota = np_iota(task, scaled, keep, scale)
    w = math.exp(-iota)
    return task + w * scaled, iota, w


def np_enchtable_learnable(task, safety, alpha, keep, scale, m_init, m0, lr, steps):
    """SGD on m with c = m0 + m, ι(c) by the direct formula on the SVDs of c·α·τ_safe; dι/dm by
    central finite differences (ι is linear in c > 0, so they are exact up to rounding)."""
    task, scaled = f64(task), alpha * f64(safety)

    def iota(c):
        return np_iota(task, c * scaled, keep, scale)

    m, h = float(m_init), 1e-4
    for _ in range(steps):
        c = m0 + m
        grad = (iota(c + h) - iota(c - h)) / (2 * h)
        m -= lr * grad
    w = m0 + m
    return task + w * scaled, iota(w), w, m


def np_trim_mask(x, density, skip=0.0):
    """Entries ranked [⌊skip·n⌋, ⌊skip·n⌋ + ⌊density·n⌋) by decreasing magnitude."""
    flat = np.abs(f64(x)).ravel()
    n = flat.size
    start, count = math.floor(skip * n), math.floor(density * n)
    order = np.argsort(-flat, kind="stable")
    mask = np.zeros(n, bool)
    mask[order[start:start + count]] = True
    return mask.reshape(np.shape(x))


def np_ties(task, safety, alpha, density):
    weights = [1.0, alpha]
    trimmed = [f64(d) * np_trim_mask(d, density) for d in (task, safety)]
    weighted = [w * t for w, t in zip(weights, trimmed)]
    elected = np.sign(weighted[0] + weighted[1])
    num = np.zeros_like(elected)
    den = np.zeros_like(elected)
    for w, wt in zip(weights, weighted):
        agree = (np.sign(wt) == elected) & (elected != 0)
        num += wt * agree
        den += w * agree
    return np.where(den != 0, num / np.where(den != 0, den, 1.0), 0.0)


def np_breadcrumbs(task, safety, alpha, density, gamma):
    return (f64(task) * np_trim_mask(task, density, gamma)
            + alpha * f64(safety) * np_trim_mask(safety, density, gamma))


def np_model_stock(task, safety, alpha):
    a, b = f64(task), alpha * f64(safety)
    cos = a.ravel() @ b.ravel() / (np.linalg.norm(a) * np.linalg.norm(b))
    t = 2 * cos / (1 + cos)
    return t * (a + b) / 2, t


def np_polar(x):
    p, _, qt = np.linalg.svd(x, full_matrices=False)
    return p @ qt


def np_tsv(task, safety, alpha, keep):
    a, b = f64(task), alpha * f64(safety)
    if a.ndim != 2:
        return (a + b) / 2
    u1, s1, v1 = np_top(a, keep)
    u2, s2, v2 = np_top(b, keep)
    u_perp, v_perp = np_polar(np.hstack([u1, u2])), np_polar(np.hstack([v1, v2]))
    for q in (u_perp, v_perp):  # the oracle's own check: orthonormal columns
        np.testing.assert_allclose(q.T @ q, np.eye(q.shape[1]), atol=1e-12)
    return u_perp @ np.diag(np.concatenate([s1, s2])) @ v_perp.T


def np_safelora(task, safety, threshold):
    a, v = f64(task), f64(safety)
    if a.ndim != 2:
        return a, float("nan")
    c = v @ v.T / np.linalg.norm(v)  # ‖V‖_F
    p = c @ a
    cos = (a * p).sum() / (np.linalg.norm(a) * np.linalg.norm(p))
    return (p if cos < threshold else a), cos


# ----------------------------------------------------------------------------------------------
# EnchTable


def tuned_scale(task, safety, alpha, keep, target=0.8):
    """An interference_scale putting the oracle's ι near `target`, so w = exp(−ι) is well inside (0, 1)."""
    return float(f"{target / np_iota(task, alpha * f64(safety), keep, 1.0):.4g}")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("keep", [0.25, 0.5])
def test_enchtable_matches_numpy(shape, keep):
    k = kept_count(shape, keep) if len(shape) == 2 else 1
    task, safety = overlapping_pair(shape, seed=len(shape) * 100 + shape[0] + int(keep * 8), k=k)
    scale = tuned_scale(task, safety, ALPHA, keep) if len(shape) == 2 else 200.0
    delta, stats = call("enchtable", task, safety, keep=keep, interference_scale=scale)
    want, iota, w = np_enchtable(task, safety, ALPHA, keep, scale)
    assert_rel(delta, want, what="delta")
    if len(shape) == 2:
        assert 0.2 < w < 0.8, w  # sensitive: w clearly between 0 and 1
        # and the merge is far from both extremes, so a wrong w would be seen in delta
        assert rel_err(f64(task) + ALPHA * f64(safety), want) > 1e-2
        assert rel_err(f64(task), want) > 1e-2
        assert abs(stats["interference"] - iota) <= RTOL * iota, (stats, iota)
        assert abs(stats["weight"] - w) <= RTOL * w, (stats, w)
    else:
        assert math.isnan(stats["interference"]) and stats["weight"] == 1.0


def test_enchtable_defaults_on_small_deltas():
    """Default γ = 0.5 and scale 200 on deltas of fine-tuning size (norm ~1e-2)."""
    shape = (40, 24)
    task, safety = overlapping_pair(shape, seed=5, k=kept_count(shape, 0.5))
    factor = 1.0 / np_iota(task, ALPHA * f64(safety), 0.5, 200.0)  # ι is 1-homogeneous in the deltas
    task, safety = (task * factor).astype(np.float32), (safety * factor).astype(np.float32)
    delta, stats = call("enchtable", task, safety)
    want, iota, w = np_enchtable(task, safety, ALPHA, 0.5, 200.0)
    assert 0.2 < w < 0.6
    assert_rel(delta, want, what="delta")
    assert abs(stats["weight"] - w) <= RTOL * w


def test_enchtable_keeps_at_least_one_triplet():
    shape = (24, 40)
    task, safety = overlapping_pair(shape, seed=11, k=1)
    keep = 0.01  # ⌊0.01·24⌋ = 0 → 1
    scale = tuned_scale(task, safety, ALPHA, keep)
    delta, stats = call("enchtable", task, safety, keep=keep, interference_scale=scale)
    want, iota, w = np_enchtable(task, safety, ALPHA, keep, scale)
    assert 0.2 < w < 0.8
    assert_rel(delta, want, what="delta")
    assert abs(stats["interference"] - iota) <= RTOL * iota


@pytest.mark.parametrize("shape", MATRIX_SHAPES)
def test_enchtable_learnable_matches_numpy_sgd(shape):
    keep, m_init, m0, steps = 0.25, 0.45, 0.4, 12
    task, safety = overlapping_pair(shape, seed=3, k=kept_count(shape, keep))
    scale = tuned_scale(task, safety, ALPHA, keep)
    # dι/dm is constant for c > 0; pick lr so that m moves by about 0.25 over all steps
    h = 1e-4
    g = (np_iota(task, (1 + h) * ALPHA * f64(safety), keep, scale)
         - np_iota(task, (1 - h) * ALPHA * f64(safety), keep, scale)) / (2 * h)
    lr = float(f"{0.25 / (steps * g):.3g}")
    want, iota, w, m = np_enchtable_learnable(task, safety, ALPHA, keep, scale, m_init, m0, lr, steps)
    assert 0.15 < m < m_init - 0.1, m  # moved measurably, stayed positive
    delta, stats = call("enchtable", task, safety, keep=keep, interference_scale=scale, learnable=True,
                        m_init=m_init, m0=m0, lr=lr, steps=steps)
    assert abs(stats["weight"] - w) <= RTOL * w, (stats["weight"], w)
    assert abs(stats["interference"] - iota) <= RTOL * iota, (stats["interference"], iota)
    assert_rel(delta, want, what="delta")


def test_enchtable_learnable_1d_is_plain_sum():
    task, safety = overlapping_pair((48,), seed=2, k=1)
    delta, stats = call("enchtable", task, safety, learnable=True, steps=3)
    assert_rel(delta, f64(task) + ALPHA * f64(safety))


@pytest.mark.parametrize("shape", MATRIX_SHAPES + [(64, 16), (16, 64)])
@pytest.mark.parametrize("keep", [0.5, 0.25, 0.01])
@pytest.mark.parametrize("kind", ["overlapping", "random"])
def test_block_formula_equals_direct_formula(shape, keep, kind):
    if kind == "overlapping":
        task, safety = overlapping_pair(shape, seed=7, k=kept_count(shape, keep))
    else:
        rng = np.random.default_rng(8)
        task, safety = (rng.standard_normal(shape).astype(np.float32) for _ in range(2))
    want = np_iota(task, safety, keep, 200.0)
    block = float(spectral.interference(f32(task), f32(safety), keep, 200.0))
    direct = float(spectral.interference_direct(f32(task), f32(safety), keep, 200.0))
    # random Gaussian matrices have small singular gaps: their float32 SVD is less accurate
    tol = RTOL if kind == "overlapping" else 5e-5
    assert abs(block - want) <= tol * want, (block, want)
    assert abs(direct - want) <= tol * want, (direct, want)
    assert abs(block - direct) <= tol * want, (block, direct)


# ----------------------------------------------------------------------------------------------
# baselines


def random_pair(shape, seed):
    rng = np.random.default_rng(seed)
    task = rng.standard_normal(shape).astype(np.float32)
    safety = (0.5 * task + rng.standard_normal(shape)).astype(np.float32)  # positively correlated
    return task, safety


@pytest.mark.parametrize("shape", SHAPES)
def test_task_arithmetic(shape):
    task, safety = random_pair(shape, 1)
    delta, stats = call("task_arithmetic", task, safety)
    assert_rel(delta, f64(task) + ALPHA * f64(safety))
    assert stats["weight"] == pytest.approx(ALPHA)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", [0.5, 0.3])
def test_ties(shape, density):
    task, safety = random_pair(shape, 2)
    delta, _ = call("ties", task, safety, density=density)
    want = np_ties(task, safety, ALPHA, density)
    assert_rel(delta, want)
    # sensitivity: entries where only one delta survives, where both agree, and where none survive
    m1, m2 = np_trim_mask(task, density), np_trim_mask(safety, density)
    both_agree = m1 & m2 & (np.sign(task) == np.sign(safety))
    assert both_agree.any() and (m1 ^ m2).any() and (~m1 & ~m2).any()
    # an agreeing pair is the weighted mean (t + α s)/(1 + α), not the sum
    np.testing.assert_allclose(delta[both_agree], ((f64(task) + ALPHA * f64(safety)) / (1 + ALPHA))[both_agree],
                               rtol=1e-6)


@pytest.mark.parametrize("fraction,skip", [(0.5, 0.0), (0.3, 0.25), (0.9, 0.01), (1.0, 0.0), (0.0, 0.5)])
def test_trim_mask_breaks_ties_in_index_order(fraction, skip):
    """Many exact ties (and ±0) at the cut: kept first to last, as a stable sort by magnitude would."""
    rng = np.random.default_rng(11)
    x = rng.choice(np.float32([0.0, -0.0, 0.25, -0.25, 0.5, 1.0, -3.0]), size=(37, 11))
    got = np.asarray(_top_magnitude_mask(jnp.asarray(x), fraction, skip))
    np.testing.assert_array_equal(got, np_trim_mask(x, fraction, skip))
    assert got.sum() == math.floor(fraction * x.size)


def test_ties_disagreeing_entries():
    """Opposite signs: the elected sign wins alone; exact cancellation gives 0."""
    task = np.array([2.0, -1.0, 1.0, 3.0], np.float32)
    safety = np.array([-1.0, 3.0, -2.0, 0.0], np.float32)  # α = 0.5: weighted safety [-0.5, 1.5, -1, 0]
    delta, _ = call("ties", task, safety, alpha=0.5, density=1.0)
    np.testing.assert_allclose(delta, np_ties(task, safety, 0.5, 1.0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(delta, [2.0, 3.0, 0.0, 3.0], rtol=1e-6, atol=1e-6)


def separable_pair(shape, seed):
    """|τ_task| ∈ [1, 2], |α·τ_safe| ∈ [3, 4]: the four candidates 0, t, αs, t + αs of a DARE entry
    (before 1/density) are pairwise at least 1 apart, so the masks can be read off the output."""
    rng = np.random.default_rng(seed)
    sign = lambda: rng.choice([-1.0, 1.0], size=shape)  # noqa: E731
    task = sign() * rng.uniform(1, 2, shape)
    safety = sign() * rng.uniform(3, 4, shape) / ALPHA
    return task.astype(np.float32), safety.astype(np.float32)


def dare_masks(out, task, safety, density):
    """Recover (m1, m2) from a DARE output and check it is exactly one of the four candidates."""
    t, s = f64(task) / density, ALPHA * f64(safety) / density
    candidates = np.stack([np.zeros_like(t), t, s, t + s])  # (m1, m2) = 00, 10, 01, 11
    dist = np.abs(f64(out)[None] - candidates)
    pick = np.argmin(dist, axis=0)
    nearest = np.take_along_axis(dist, pick[None], 0)[0]
    assert np.all(nearest <= 1e-6 * (np.abs(t) + np.abs(s))), nearest.max()  # float32 rounding only
    return (pick == 1) | (pick == 3), (pick == 2) | (pick == 3)


@pytest.mark.parametrize("shape,density", [((200, 300), 0.5), ((300, 200), 0.3), ((60000,), 0.8)])
def test_dare_masks_and_rescale(shape, density):
    task, safety = separable_pair(shape, 4)
    out, stats = call("dare", task, safety, density=density)
    m1, m2 = dare_masks(out, task, safety, density)
    n = m1.size
    sigma = math.sqrt(n * density * (1 - density))
    for mask in (m1, m2):  # kept fraction ≈ density (binomial, 5σ)
        assert abs(mask.sum() - n * density) <= 5 * sigma, (mask.sum(), n * density)
    # the two masks are independent draws
    both = (m1 & m2).sum()
    p = density**2
    assert abs(both - n * p) <= 5 * math.sqrt(n * p * (1 - p))
    assert (m1 != m2).any()
    # delta = τ_task·m1/d + α·τ_safe·m2/d
    want = (f64(task) * m1 + ALPHA * f64(safety) * m2) / density
    assert_rel(out, want, tol=1e-6)
    assert stats["weight"] == pytest.approx(ALPHA)
    # kept entries are τ/d to float32 rounding, dropped ones exactly 0 (safety part switched off)
    only_task, _ = call("dare", task, np.zeros_like(safety), density=density)
    assert np.all(only_task[~m1] == 0)
    np.testing.assert_allclose(only_task[m1], (f64(task) / density)[m1], rtol=2e-7)


@pytest.mark.parametrize("density", [0.25, 0.375, 0.5, 0.3, 1.0])  # fields of 2, 4, 1, 16 and 0 bits
def test_dare_masks_keep_entries_independently(density):
    """Each of DARE's two masks keeps an entry with probability `density`, independently of the other mask and of
    its neighbours (which share a random word when the density needs fewer than 32 bits): binomial counts of the
    kept entries, of kept pairs across the masks and of kept neighbours, each within 5σ."""
    masks = np.asarray(_bernoulli_masks(KEY, density, 2, (300, 200)))
    assert masks.shape == (2, 300, 200) and masks.dtype == bool

    def within(kept, trials, p):
        assert abs(kept.sum() - trials * p) <= 5 * math.sqrt(trials * p * (1 - p)) + 1e-9, (kept.sum(), trials * p)

    for mask in masks:
        within(mask, mask.size, density)
        within(mask[:, :-1] & mask[:, 1:], mask[:, 1:].size, density**2)  # neighbours in one row
    within(masks[0] & masks[1], masks[0].size, density**2)


def test_dare_key_dependence():
    task, safety = separable_pair((30, 20), 5)
    a, _ = call("dare", task, safety, key=jax.random.key(0))
    b, _ = call("dare", task, safety, key=jax.random.key(0))
    c, _ = call("dare", task, safety, key=jax.random.key(1))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    ma, mc = dare_masks(a, task, safety, 0.5), dare_masks(c, task, safety, 0.5)
    assert (ma[0] != mc[0]).mean() > 0.3 and (ma[1] != mc[1]).mean() > 0.3


def test_dare_is_unbiased():
    """E[delta] = τ_task + α·τ_safe: mean over 4000 keys within 5 standard errors per entry."""
    shape, density, count = (6, 8), 0.4, 4000
    task, safety = random_pair(shape, 6)
    fn = METHODS["dare"].fn
    outs = jax.vmap(lambda k: fn(f32(task), f32(safety), jnp.float32(ALPHA), k, density=density)[0])(
        jax.random.split(jax.random.key(3), count))
    mean = f64(outs).mean(0)
    t, s = f64(task), ALPHA * f64(safety)
    stderr = np.sqrt((t**2 + s**2) * (1 - density) / density / count)
    assert np.all(np.abs(mean - (t + s)) <= 5 * stderr + 1e-6)
    assert rel_err(mean, t + s) < 0.05


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density,gamma", [(0.6, 0.1), (0.9, 0.01), (0.5, 0.3)])
def test_breadcrumbs(shape, density, gamma):
    task, safety = random_pair(shape, 7)
    delta, stats = call("breadcrumbs", task, safety, density=density, gamma=gamma)
    want = np_breadcrumbs(task, safety, ALPHA, density, gamma)
    assert_rel(delta, want)
    n = task.size
    if math.floor(gamma * n) > 0:  # the largest entry of τ_task is dropped
        i = np.argmax(np.abs(task))
        kept_safety = f64(safety).ravel()[i] * np_trim_mask(safety, density, gamma).ravel()[i]
        assert delta.ravel()[i] == pytest.approx(ALPHA * kept_safety)
    assert stats["weight"] == pytest.approx(ALPHA)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("alpha", [ALPHA, 2.5])
def test_model_stock(shape, alpha):
    task, safety = random_pair(shape, 8)
    delta, stats = call("model_stock", task, safety, alpha=alpha)
    want, t = np_model_stock(task, safety, alpha)
    assert 0.2 < t < 0.9
    assert_rel(delta, want)
    assert stats["weight"] == pytest.approx(t, rel=RTOL)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("keep", [0.5, 0.25])
@pytest.mark.parametrize("kind", ["overlapping", "independent"])
def test_tsv(shape, keep, kind):
    k = kept_count(shape, keep) if len(shape) == 2 else 1
    if kind == "overlapping":
        task, safety = overlapping_pair(shape, seed=9, k=k, overlap=0.5)
    else:
        task, _ = overlapping_pair(shape, seed=10, k=k)
        _, safety = overlapping_pair(shape, seed=12, k=k, overlap=0.0)
    delta, _ = call("tsv", task, safety, keep=keep)
    want = np_tsv(task, safety, ALPHA, keep)
    assert_rel(delta, want)
    if len(shape) == 2:  # sensitive: orthogonalisation changes the plain sum of the truncations
        u1, s1, v1 = np_top(task, keep)
        u2, s2, v2 = np_top(ALPHA * f64(safety), keep)
        assert rel_err((u1 * s1) @ v1.T + (u2 * s2) @ v2.T, want) > 1e-2


def safelora_pair(shape, seed, inside):
    """V = τ_safe of low rank ρ; τ_task = inside·(part in V's column space) + (rest outside it)."""
    rng = np.random.default_rng(seed)
    m, n = shape
    rho = max(2, min(m, n) // 3)
    basis = orthonormal(rng, m, m)
    qa, outside = basis[:, :rho], basis[:, rho:]
    v = (qa * (1 + 0.2 * rng.uniform(size=rho))) @ orthonormal(rng, n, rho).T
    task = (inside * qa @ rng.standard_normal((rho, n))
            + outside @ rng.standard_normal((m - rho, n)) * math.sqrt(rho / (m - rho)))  # equal norms at inside=1
    return task.astype(np.float32), v.astype(np.float32)


@pytest.mark.parametrize("shape", MATRIX_SHAPES)
@pytest.mark.parametrize("inside,projected", [(0.15, True), (4.0, False)])
def test_safelora_both_branches(shape, inside, projected):
    task, safety = safelora_pair(shape, 13, inside)
    want, cos = np_safelora(task, safety, 0.5)
    assert (cos < 0.4) if projected else (cos > 0.6), cos  # the case is clearly on one side
    delta, stats = call("safelora", task, safety)
    assert_rel(delta, want)
    assert stats["weight"] == pytest.approx(cos, rel=RTOL)
    if projected:
        assert rel_err(task, want) > 0.5
    else:
        np.testing.assert_array_equal(delta, task)
    # τ_safe is used unscaled: α does not change the result
    np.testing.assert_allclose(call("safelora", task, safety, alpha=3.0)[0], delta, rtol=1e-6)


@pytest.mark.parametrize("shape", MATRIX_SHAPES)
def test_safelora_threshold(shape):
    task, safety = random_pair(shape, 14)
    _, cos = np_safelora(task, safety, 0.5)
    for threshold in (cos - 0.05, cos + 0.05):
        want, _ = np_safelora(task, safety, threshold)
        assert_rel(call("safelora", task, safety, threshold=threshold)[0], want)


def test_safelora_1d():
    task, safety = random_pair((48,), 15)
    delta, stats = call("safelora", task, safety, threshold=2.0)
    np.testing.assert_array_equal(delta, task)
    assert math.isnan(stats["weight"])


# ----------------------------------------------------------------------------------------------
# options and registry


def test_registry_names_and_defaults():
    assert set(METHODS) == {"enchtable", "task_arithmetic", "ties", "dare", "breadcrumbs", "model_stock", "tsv",
                            "safelora"}
    for name, method in METHODS.items():
        params = inspect.signature(method.fn).parameters
        assert list(params)[:4] == ["task", "safety", "alpha", "key"], name
        assert set(params) - {"task", "safety", "alpha", "key", "hints"} == set(method.options), name
        assert method.uses_triplets == (name in ("enchtable", "tsv")), name
        for option_name, option in method.options.items():
            assert params[option_name].default == option.default, (name, option_name)
            assert option.help
        assert method.summary


def test_method_options_fills_defaults():
    assert method_options("ties", {}) == {"density": 0.5}
    assert method_options("task_arithmetic", {}) == {}
    opts = method_options("enchtable", {"keep": 0.3, "learnable": True})
    assert opts == {"keep": 0.3, "interference_scale": 200.0, "solver": "auto", "learnable": True, "m_init": 0.5,
                    "m0": 0.5, "lr": 1e3, "steps": 40}
    assert method_options("breadcrumbs", {"gamma": 0.05}) == {"density": 0.9, "gamma": 0.05}


def test_method_options_rejects_unknown():
    with pytest.raises(ValueError, match="no option") as e:
        method_options("breadcrumbs", {"gama": 0.1, "density": 0.5})
    message = str(e.value)
    assert "gama" in message and "density" in message and "gamma" in message
    with pytest.raises(ValueError, match="none"):
        method_options("task_arithmetic", {"alpha": 2.0})
    with pytest.raises(ValueError, match="unknown merge method 'resta'") as e:
        method_options("resta", {})
    assert all(name in str(e.value) for name in METHODS)


# ----------------------------------------------------------------------------------------------
# jit and vmap, and the trace-time shape checks


JIT_CASES = [
    ("enchtable", dict(keep=0.25, interference_scale=50.0)),
    ("enchtable", dict(keep=0.25, interference_scale=50.0, learnable=True, lr=0.02, steps=4)),
    ("task_arithmetic", {}),
    ("ties", dict(density=0.4)),
    ("dare", dict(density=0.6)),
    ("breadcrumbs", dict(density=0.5, gamma=0.1)),
    ("model_stock", {}),
    ("tsv", dict(keep=0.25)),
    ("safelora", dict(threshold=0.9)),
]
CASE_IDS = [f"{n}-{i}" for i, (n, _) in enumerate(JIT_CASES)]


def oracle(name, options, task, safety, delta):
    """(delta, stats) of the float64 oracle for a JIT_CASES entry on a matrix; `delta` (ours) is read only by
    DARE's, which recovers its random masks from it."""
    nan = float("nan")
    if name == "enchtable" and options.get("learnable"):
        want, iota, w, _ = np_enchtable_learnable(task, safety, ALPHA, options["keep"], options["interference_scale"],
                                                  0.5, 0.5, options["lr"], options["steps"])
        return want, {"interference": iota, "weight": w}
    if name == "enchtable":
        want, iota, w = np_enchtable(task, safety, ALPHA, options["keep"], options["interference_scale"])
        return want, {"interference": iota, "weight": w}
    if name == "dare":
        m1, m2 = dare_masks(delta, task, safety, options["density"])
        return (f64(task) * m1 + ALPHA * f64(safety) * m2) / options["density"], {"interference": nan, "weight": ALPHA}
    if name == "model_stock":
        want, t = np_model_stock(task, safety, ALPHA)
        return want, {"interference": nan, "weight": t}
    if name == "tsv":
        return np_tsv(task, safety, ALPHA, options["keep"]), {"interference": nan, "weight": nan}
    if name == "safelora":
        want, cos = np_safelora(task, safety, options["threshold"])
        return want, {"interference": nan, "weight": cos}
    plain = {"task_arithmetic": lambda: f64(task) + ALPHA * f64(safety),
             "ties": lambda: np_ties(task, safety, ALPHA, options["density"]),
             "breadcrumbs": lambda: np_breadcrumbs(task, safety, ALPHA, options["density"], options["gamma"])}
    return plain[name](), {"interference": nan, "weight": ALPHA}


class MethodsUnderJitTest(chex.TestCase):
    """Every method, jitted and not, against its float64 oracle: jit must not change a formula (static options,
    shape branches taken at trace time)."""

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(*((case_id, name, options) for case_id, (name, options) in zip(CASE_IDS,
                                                                                                   JIT_CASES)))
    def test_matches_oracle(self, name, options):
        shape = (24, 40)
        task, safety = (separable_pair(shape, 4) if name == "dare"
                        else overlapping_pair(shape, seed=20, k=kept_count(shape, 0.25)))
        fn = self.variant(METHODS[name].fn, static_argnames=tuple(options))
        delta, stats = fn(f32(task), f32(safety), jnp.float32(ALPHA), KEY, **options)
        want, want_stats = oracle(name, options, task, safety, np.asarray(delta))
        assert_rel(delta, want, what=f"{self.variant.type} delta")
        chex.assert_trees_all_close(stats, want_stats, rtol=RTOL, atol=1e-7)


@pytest.mark.parametrize("shape", [(24, 40), (48,)])
@pytest.mark.parametrize("name,options", JIT_CASES, ids=CASE_IDS)
def test_vmap_equals_per_tensor_calls(name, options, shape):
    fn = METHODS[name].fn
    k = kept_count(shape, 0.25) if len(shape) == 2 else 1
    pairs = [overlapping_pair(shape, seed=20 + i, k=k) for i in range(3)]
    tasks, safeties = f32(np.stack([p[0] for p in pairs])), f32(np.stack([p[1] for p in pairs]))
    alpha = jnp.float32(ALPHA)
    one_by_one = [fn(tasks[i], safeties[i], alpha, KEY, **options) for i in range(3)]
    mapped = jax.vmap(lambda t, s: fn(t, s, alpha, KEY, **options))(tasks, safeties)
    chex.assert_trees_all_close(mapped, jax.tree.map(lambda *xs: jnp.stack(xs), *one_by_one), rtol=RTOL, atol=1e-6)


@pytest.mark.parametrize("task,safety,message", [
    ((3, 24, 40), (3, 24, 40), "rank"),  # a stacked group, not mapped over
    ((24, 40), (40, 24), "shape"),  # τ_safe of another tensor
    ((), (), "rank"),
])
@pytest.mark.parametrize("name", ["enchtable", "task_arithmetic", "dare"])
def test_wrong_shapes_are_refused_when_traced(name, task, safety, message):
    """`register`'s check runs at trace time: eval_shape traces with shapes only, no value is ever computed."""
    spec = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
    with pytest.raises(AssertionError, match=rf"(?s){message}.*merge method {name}: τ_task"):
        jax.eval_shape(lambda t, s: METHODS[name].fn(t, s, jnp.float32(ALPHA), KEY), spec(task), spec(safety))


@pytest.mark.parametrize("shape", [(96, 40), (40, 96)])
def test_gram_solver_matches_svd_on_a_decaying_spectrum(shape):
    """The Gram-eigh fast path gives the same interference as the exact SVD while the kept spectrum spans
    about one order of magnitude (float32)."""
    rng = np.random.default_rng(3)
    k = min(shape)
    u, _ = np.linalg.qr(rng.normal(size=(shape[0], k)))
    v, _ = np.linalg.qr(rng.normal(size=(shape[1], k)))
    s = np.exp(-np.arange(k) / 8.0)
    task = (u * s) @ v.T
    safety = task + 0.3 * s.mean() * rng.normal(size=shape)
    exact = float(spectral.interference(jnp.asarray(task, jnp.float32), jnp.asarray(safety, jnp.float32)))
    fast = float(spectral.interference(jnp.asarray(task, jnp.float32), jnp.asarray(safety, jnp.float32),
                                       solver="gram"))
    oracle = np_iota(task, safety, 0.5, 200.0)
    assert abs(exact - oracle) <= 1e-5 * oracle and abs(fast - oracle) <= 1e-5 * oracle


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[-1]])  # a matrix (wide, as most) and a vector
@pytest.mark.parametrize("name,options", [(n, o) for n in METHODS for o in ({}, {"learnable": True})
                                          if "learnable" in METHODS[n].options or not o])
def test_weighted_methods_give_task_plus_weight_times_scaled_safety(shape, name, options):
    """`Method.weighted` promises delta = τ_task + w·(α·τ_safe) with w the `weight` statistic (the executor forms the
    deltas of such a method on the host from w alone): held against that float64 formula; a method that does not
    promise it must differ from it."""
    task, safety = random_pair(shape, seed=7)
    delta, stats = call(name, task, safety, **options)
    if not np.isfinite(stats["weight"]):
        assert not METHODS[name].weighted, name
        return
    formula = f64(task) + stats["weight"] * (ALPHA * f64(safety))
    if METHODS[name].weighted:
        assert_rel(delta, formula, 1e-6, name)
    else:
        assert rel_err(delta, formula) > 1e-6, name
