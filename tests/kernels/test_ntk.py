"""Empirical NTK: both implementations equal J Jᵀ from jax.jacrev; the overlap diagnostic equals its
definition computed from explicit Jacobians; neural-tangents (imported through kernels/nt_compat.py) computes
the same kernel, and is explained when absent."""

import importlib.util

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from enchtable_jax.models.model import Model
from enchtable_jax.kernels import ntk
from enchtable_jax.kernels.ntk import empirical_ntk, kernel_overlap, last_token_logits, ntk_overlap, response_logprob
from enchtable_jax.kernels.scopes import resolve_scope
from enchtable_jax.models import init_params, preset_config
from enchtable_jax.models.transformer import forward

CONFIG = preset_config("tiny", "llama", num_hidden_layers=2, vocab_size=64, hidden_size=32, intermediate_size=48)
MODEL = Model(CONFIG, init_params(CONFIG, seed=0, std=0.1))


def _batch(n, seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, CONFIG.vocab_size, (n, 9)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[0, 6:] = 0
    loss_mask = mask.copy()
    loss_mask[:, :4] = 0
    return {"input_ids": ids, "attention_mask": mask, "loss_mask": loss_mask}


def _jacrev_kernel(scope, readout, b1, b2):
    """J(b1) J(b2)ᵀ with J from jax.jacrev of the whole batch's readout."""
    sub = {n: MODEL.params[n] for n in scope.params}

    def jac(b):
        g = lambda s: readout(forward({**MODEL.params, **s}, CONFIG, b["input_ids"], b["attention_mask"]), b)  # noqa: E731
        j = jax.jacrev(lambda s: g(s).reshape(b["input_ids"].shape[0], -1))(sub)
        return jnp.concatenate([v.reshape(*v.shape[:2], -1) for v in jax.tree.leaves(j)], axis=-1)

    k = jnp.einsum("aox,bpx->abop", jac(b1), jac(b2))
    return k[:, :, 0, 0] if k.shape[2] == 1 else k


# logprob by the Jacobian (8 s) is slow: the Jacobian method is checked on logits, the logprob readout by NTVPs
@pytest.mark.parametrize("method,readout_name", [pytest.param("jacobian", "logprob", marks=pytest.mark.slow),
                                                 ("ntvp", "logprob"), ("jacobian", "logits"), ("ntvp", "logits")])
def test_ntk_equals_jacobian_product(method, readout_name):
    scope = resolve_scope(CONFIG, "ffn", "1:")
    readout = response_logprob if readout_name == "logprob" else last_token_logits([3, 17, 40])
    b1, b2 = _batch(5, 1), _batch(3, 2)
    b1, b2 = ({k: jnp.asarray(v) for k, v in b.items()} for b in (b1, b2))
    ours = empirical_ntk(MODEL, scope, b1, b2, readout=readout, method=method, chunk=2)  # chunks with padding
    oracle = _jacrev_kernel(scope, readout, b1, b2)
    assert ours.shape == oracle.shape == ((5, 3) if readout_name == "logprob" else (5, 3, 3, 3))
    assert float(jnp.abs(ours - oracle).max() / jnp.abs(oracle).max()) <= 1e-5


class KernelsUnderJitTest(chex.TestCase):
    """Each implementation's kernel function, traced under jit and run op by op, equals J Jᵀ: the jit around
    it must not change what it computes."""

    @chex.variants(with_jit=True)  # the eager variant (9 s of the default suite) adds nothing the jitted one misses
    @parameterized.named_parameters(("jacobian", "_ntk_jacobian"), ("ntvp", "_ntk_ntvp"))
    def test_kernel_equals_jacobian_product(self, name):
        kernel_fn = self.variant(getattr(ntk, name).__wrapped__, static_argnames=("config", "readout"))
        scope = resolve_scope(CONFIG, "ffn", "1:")
        b1, b2 = ({k: jnp.asarray(v) for k, v in _batch(n, seed).items()} for n, seed in ((3, 1), (2, 2)))
        sub = {n: MODEL.params[n] for n in scope.params}
        ours = kernel_fn(MODEL.params, sub, CONFIG, response_logprob, b1, b2)[:, :, 0, 0]
        chex.assert_trees_all_close(ours, _jacrev_kernel(scope, response_logprob, b1, b2), rtol=1e-5, atol=1e-6)


def test_kernel_is_symmetric_positive_semidefinite():
    scope = resolve_scope(CONFIG, "attn_block")
    k = np.asarray(empirical_ntk(MODEL, scope, _batch(4, 3), method="ntvp"), np.float64)
    np.testing.assert_allclose(k, k.T, rtol=1e-5, atol=1e-6 * np.abs(k).max())
    assert np.linalg.eigvalsh((k + k.T) / 2).min() >= -1e-5 * np.abs(k).max()


def test_overlap_matches_its_definition_on_explicit_jacobians():
    rng = np.random.default_rng(0)
    shared = rng.normal(size=(2, 30))
    j_h = np.concatenate([shared, rng.normal(size=(2, 30))])  # harmful gradients: 2 shared directions + 2 own
    j_t = rng.normal(size=(3, 2)) @ shared + 0.3 * rng.normal(size=(3, 30))
    got = kernel_overlap(j_h @ j_h.T, j_t @ j_t.T, j_h @ j_t.T)
    projector = j_h.T @ np.linalg.pinv(j_h @ j_h.T) @ j_h  # onto the span of the harmful gradients
    energy = np.linalg.norm(j_t @ projector) ** 2 / np.linalg.norm(j_t) ** 2
    gram_h, gram_t = j_h.T @ j_h, j_t.T @ j_t
    alignment = np.sqrt(np.trace(gram_h @ gram_t)) / np.sqrt(np.linalg.norm(gram_h) * np.linalg.norm(gram_t))
    cos = (j_h @ j_t.T) / np.outer(np.linalg.norm(j_h, axis=1), np.linalg.norm(j_t, axis=1))
    np.testing.assert_allclose(got["task_energy_in_harmful_span"], energy, rtol=1e-9)
    np.testing.assert_allclose(got["alignment"], alignment, rtol=1e-9)
    np.testing.assert_allclose(got["mean_abs_cosine"], np.abs(cos).mean(), rtol=1e-9)
    assert 0.5 < energy < 1.0 and 0 < alignment < 1


def test_overlap_of_a_batch_with_itself_is_total():
    scope = resolve_scope(CONFIG, "ffn")
    b = _batch(3, 4)
    got = ntk_overlap(MODEL, scope, b, b)
    assert got["alignment"] == pytest.approx(1.0, abs=1e-6)
    assert got["task_energy_in_harmful_span"] == pytest.approx(1.0, abs=1e-5)


def test_neural_tangents_absent_is_explained(monkeypatch):
    def absent():
        raise ModuleNotFoundError("No module named 'neural_tangents'", name="neural_tangents")

    monkeypatch.setattr(ntk, "import_neural_tangents", absent)
    with pytest.raises(ImportError, match="neural-tangents is unavailable.*--no-deps neural-tangents==0.6.5.*"
                                          "method='jacobian' or 'ntvp'"):
        ntk.neural_tangents_module()


@pytest.mark.skipif(importlib.util.find_spec("neural_tangents") is None,
                    reason="neural-tangents is not installed (pip install --no-deps neural-tangents==0.6.5)")
@pytest.mark.parametrize("readout_name", ["logprob", "logits"])
def test_neural_tangents_agrees_with_jacobian_contraction(readout_name):
    scope = resolve_scope(CONFIG, "ffn", "1:")
    readout = response_logprob if readout_name == "logprob" else last_token_logits([3, 17, 40])
    b1, b2 = _batch(3, 6), _batch(2, 7)
    ours = empirical_ntk(MODEL, scope, b1, b2, readout=readout, method="jacobian", chunk=2)
    theirs = empirical_ntk(MODEL, scope, b1, b2, readout=readout, method="neural_tangents", chunk=2)
    assert theirs.shape == ours.shape == ((3, 2) if readout_name == "logprob" else (3, 2, 3, 3))
    assert float(jnp.abs(ours - theirs).max() / jnp.abs(ours).max()) <= 1e-5


def test_unknown_method():
    with pytest.raises(ValueError, match="jacobian, ntvp, neural_tangents"):
        empirical_ntk(MODEL, resolve_scope(CONFIG, "ffn"), _batch(2, 5), method="exact")
