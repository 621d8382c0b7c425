"""Oracle test against mergekit (Arcee AI, pinned 0.1.5 in the `test` extra) for the methods it also
implements: task arithmetic, TIES, DARE, Model Breadcrumbs and Model Stock, every tensor of a tiny Llama.

Mapping of our two-delta merge onto mergekit's "models relative to a base_model": base_model = θ_base;
models = θ_task with weight 1, and a "safe" folder θ_base + τ_safe (τ_safe = θ_aligned − θ_harmful)
with weight α. mergekit multiplies each model's delta (θ_i − θ_base) by its weight, so the second model
contributes α·τ_safe, as ours does. Every mergekit option that could change the formula is written
out in the configuration (defaults differ between its methods); the conventions that differ are:

- `normalize` (divide the summed weighted deltas by the sum of weights): false for task arithmetic,
  DARE and breadcrumbs (ours is the plain sum τ_task' + α·τ_safe'); true for TIES, whose divisor in
  both implementations is the sum of the weights of the deltas agreeing with the elected sign.
- DARE's rescale: ours divides the kept entries by `density`; mergekit's `rescale: true` (the
  dare_linear default) instead rescales each sparsified delta to its original L1 norm, which is 1/density
  only in expectation. So the test sets `rescale: false` and folds 1/density into the weights:
  weights 1/p and α/p.
- Model Stock has no weights in mergekit: α enters through the safe folder θ_base + α·τ_safe.
- Ours copies a tensor unchanged from the task model where τ_safe is exactly zero; mergekit's TIES and
  breadcrumbs would still sparsify τ_task there. So every tensor here gets a non-zero τ_safe.

Inputs: for the discontinuous methods (top-k masks of TIES and breadcrumbs) harmful = θ_base and
aligned = the safe folder, so both implementations compute τ_safe by the same float32 subtraction and
see bit-identical deltas (no top-k boundary can flip by rounding; random data has no magnitude ties).
The continuous methods use a harmful model different from the base, and mergekit's safe folder is
θ_base + (θ_aligned − θ_harmful) rounded to float32, hence the tolerance. DARE is random: with density 1
it is compared exactly (= task arithmetic), otherwise statistically (which of the four values
0, τ_task/p, α·τ_safe/p, (τ_task + α·τ_safe)/p each entry took, and how often).
"""

from __future__ import annotations

import importlib.metadata
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

try:
    with warnings.catch_warnings():  # mergekit 0.1.5 touches the deprecated numpy.core on import
        warnings.simplefilter("ignore", DeprecationWarning)
        import yaml
        from mergekit.config import MergeConfiguration
        from mergekit.merge import MergeOptions, run_merge
except Exception as err:  # noqa: BLE001 - any failure to import the oracle is a reason to skip, not a failure
    pytest.skip(f"mergekit is not importable ({type(err).__name__}: {err}); install the `test` extra "
                "(mergekit==0.1.5) to run this oracle test", allow_module_level=True)

import enchtable_jax as ej
from enchtable_jax.merging.executor import merge_mesh
from enchtable_jax.merging.pipeline import merge
from enchtable_jax.models import init_params, preset_config

SMALL = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=48, vocab_size=64)
RTOL, ATOL = 1e-5, 1e-7


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """HF folders of a tiny Llama: base, task, aligned, harmful, and mergekit's safe folders.

    Every tensor (embeddings, attention, MLP, norms, head) gets random task and safety deltas.
    """
    root = tmp_path_factory.mktemp("mergekit")
    config = preset_config("tiny", **SMALL)
    base = {n: np.asarray(v, np.float32) for n, v in init_params(config, seed=0, std=0.1).items()}
    rng = np.random.default_rng(7)

    def plus(params, scale):
        return {n: (v + scale * rng.normal(size=v.shape)).astype(np.float32) for n, v in params.items()}

    task, aligned, harmful = plus(base, 0.02), plus(base, 0.03), plus(base, 0.02)
    tau_safe = {n: aligned[n] - harmful[n] for n in base}
    models = {"base": base, "task": task, "aligned": aligned, "harmful": harmful,
              # θ_base + τ_safe and θ_base + τ_safe/2 (model stock with α = 0.5), rounded to float32
              "safe": {n: base[n] + tau_safe[n] for n in base},
              "safe_half": {n: base[n] + np.float32(0.5) * tau_safe[n] for n in base}}
    folders = {role: ej.save(ej.Model(config, {n: jnp.asarray(v) for n, v in params.items()}), root / role,
                             progress=False)
               for role, params in models.items()}
    assert all(np.any(aligned[n] != harmful[n]) for n in base)
    return folders


def _mergekit(world, out, method, weights, shared, per_model=None, safe="safe"):
    """Run mergekit (CPU, local folders, no tokenizer) on base + [task, safe]; its tensors by name."""
    from safetensors.numpy import load_file

    per_model = per_model or {}
    config = {
        "merge_method": method,
        "base_model": str(world["base"]),
        "dtype": "float32",
        "out_dtype": "float32",
        "models": [{"model": str(world[role]),
                    "parameters": {**({"weight": w} if w is not None else {}), **per_model}}
                   for role, w in (("task", weights[0]), (safe, weights[1]))],
        **({"parameters": shared} if shared else {}),
    }
    text = yaml.safe_dump(config, sort_keys=False)
    out.mkdir(parents=True)
    (out / "mergekit.yaml").write_text(text)  # for a look when a comparison fails
    options = MergeOptions(device="cpu", lazy_unpickle=False, copy_tokenizer=False, write_model_card=False,
                           quiet=True, random_seed=0)
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(out / "merged"), options)
    tensors = {}
    for shard in sorted((out / "merged").glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def _ours(world, method, alpha, exact_safety=False, **options):
    """Our merge; exact_safety: τ_safe = safe − base, the very subtraction mergekit does (see above)."""
    aligned, harmful = ("safe", "base") if exact_safety else ("aligned", "harmful")
    model = merge(method, world["base"], world["task"], aligned=world[aligned], harmful=world[harmful],
                  alpha=alpha, mesh=merge_mesh(jax.devices()[:1]), progress=False, **options).model
    return {n: np.asarray(v) for n, v in model.params.items()}


def _assert_same(ours, theirs, rtol=RTOL, atol=ATOL):
    assert len(theirs) == 2 + 9 * SMALL["num_hidden_layers"] + 1
    assert {w.dtype for w in theirs.values()} == {np.dtype(np.float32)}
    chex.assert_trees_all_close(ours, theirs, rtol=rtol, atol=atol, strict=True)  # same names, shapes and dtypes


def test_mergekit_version():
    assert importlib.metadata.version("mergekit") == "0.1.5"  # the configuration below is written for it


@pytest.mark.parametrize("alpha", [1.0, 0.7])
def test_task_arithmetic(world, tmp_path, alpha):
    theirs = _mergekit(world, tmp_path / "mergekit", "task_arithmetic", (1.0, alpha),
                       {"normalize": False, "rescale": False, "lambda": 1.0, "int8_mask": False})
    _assert_same(_ours(world, "task_arithmetic", alpha), theirs)


@pytest.mark.parametrize("density", [0.5, 0.2])
def test_ties(world, tmp_path, density):
    # sign election by the sum of weighted trimmed deltas ("consensus_method: sum", the TIES paper's);
    # mergekit's majority sign is +1 where that sum is exactly 0, ours is 0 (no entry agrees): only
    # reachable with exactly cancelling or all-zero entries, where both give 0.
    alpha = 0.7
    theirs = _mergekit(world, tmp_path / "mergekit", "ties", (1.0, alpha),
                       {"normalize": True, "rescale": False, "lambda": 1.0, "int8_mask": False},
                       {"density": density})
    _assert_same(_ours(world, "ties", alpha, exact_safety=True, density=density), theirs)


@pytest.mark.parametrize("density,gamma", [(0.9, 0.01), (0.6, 0.1)])
def test_breadcrumbs(world, tmp_path, density, gamma):
    # mergekit keeps the ascending-magnitude ranks [n − ⌊density·n⌋ − ⌊gamma·n⌋, n − ⌊gamma·n⌋), ours
    # the descending ranks [⌊gamma·n⌋, ⌊gamma·n⌋ + ⌊density·n⌋): the same entries while density + gamma ≤ 1.
    alpha = 0.7
    theirs = _mergekit(world, tmp_path / "mergekit", "breadcrumbs", (1.0, alpha),
                       {"normalize": False, "rescale": False, "lambda": 1.0, "int8_mask": False},
                       {"density": density, "gamma": gamma})
    _assert_same(_ours(world, "breadcrumbs", alpha, exact_safety=True, density=density, gamma=gamma), theirs)


@pytest.mark.parametrize("alpha,safe", [(1.0, "safe"), (0.5, "safe_half")])
def test_model_stock(world, tmp_path, alpha, safe):
    # per tensor (filter_wise: false): cos of the two deltas, t = 2cos/(1 + cos), θ_base + t·mean of deltas
    theirs = _mergekit(world, tmp_path / "mergekit", "model_stock", (None, None), {"filter_wise": False}, safe=safe)
    _assert_same(_ours(world, "model_stock", alpha), theirs)


def test_dare_density_one_is_task_arithmetic(world, tmp_path):
    alpha = 0.7
    theirs = _mergekit(world, tmp_path / "mergekit", "dare_linear", (1.0, alpha),
                       {"normalize": False, "rescale": False, "lambda": 1.0, "int8_mask": False},
                       {"density": 1.0})
    _assert_same(_ours(world, "dare", alpha, density=1.0), theirs)


def _dare_classes(merged, world, alpha, p):
    """Per entry, which of 0, τ_task/p, α·τ_safe/p, (τ_task + α·τ_safe)/p the merged delta is: counts."""
    base, task, aligned, harmful = ({n: np.asarray(v, np.float64) for n, v in ej.load(world[r]).params.items()}
                                    for r in ("base", "task", "aligned", "harmful"))
    counts = np.zeros(4, np.int64)
    for name, value in merged.items():
        t, s = task[name] - base[name], alpha * (aligned[name] - harmful[name])
        candidates = np.stack([np.zeros_like(t), t / p, s / p, (t + s) / p])
        distance = np.abs(np.float64(value) - base[name] - candidates)
        nearest = np.argmin(distance, axis=0)
        assert np.all(np.min(distance, axis=0) <= 1e-6), name  # each entry is one of the four
        counts += np.bincount(nearest.reshape(-1), minlength=4)
    return counts


def test_dare_drops_and_rescales_like_mergekit(world, tmp_path):
    # mergekit's dare_linear default `rescale: true` restores each sparsified delta's L1 norm; ours divides
    # by the density (the DARE paper's 1/(1 − drop rate)). With `rescale: false` and weights 1/p and α/p
    # mergekit computes (m₁·τ_task + α·m₂·τ_safe)/p with independent Bernoulli(p) masks, as ours does.
    alpha, p = 0.7, 0.3
    theirs = _mergekit(world, tmp_path / "mergekit", "dare_linear", (1.0 / p, alpha / p),
                       {"normalize": False, "rescale": False, "lambda": 1.0, "int8_mask": False},
                       {"density": p})
    ours = _ours(world, "dare", alpha, density=p)
    assert set(ours) == set(theirs)
    expected = np.array([(1 - p) ** 2, p * (1 - p), (1 - p) * p, p * p])  # neither, task only, safety only, both
    for counts in (_dare_classes(ours, world, alpha, p), _dare_classes(theirs, world, alpha, p)):
        n = counts.sum()
        sigma = np.sqrt(n * expected * (1 - expected))
        assert np.all(np.abs(counts - n * expected) <= 5 * sigma), (counts, n * expected)
