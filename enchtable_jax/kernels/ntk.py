"""Empirical NTK Θ(x1, x2) = J(x1) J(x2)ᵀ of a readout, over a scope's parameters at θ0.

At θ0 the linearized model and the model share their Jacobian, so the kernel of either is that of
the plain forward with respect to the scope's tensors. Two implementations that must agree:
- "jacobian": per-example Jacobians (reverse mode, vmapped), contracted leaf by leaf;
- "ntvp": NTK-vector products, J(x1) (J(x2)ᵀ e) by one vjp then one jvp, never forming J.
"neural_tangents" uses that package's `empirical_ntk_fn` (Jacobian contraction), imported through
`nt_compat` (0.6.5 does not import on current JAX by itself).

A readout maps (logits [B, T, V], batch) to one scalar [B] or a few numbers [B, O] per example; the
kernel is [N1, N2] or [N1, N2, O, O]. Batches are dicts of [B, T] arrays as in `train_step`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from enchtable_jax.errors import EnchtableError, MissingExtraError
from enchtable_jax.kernels.nt_compat import import_neural_tangents
from enchtable_jax.kernels.scopes import Scope
from enchtable_jax.kernels.train_step import Batch
from enchtable_jax.models.config import ModelConfig
from enchtable_jax.models.transformer import Params, forward

Readout = Callable[[jax.Array, Batch], jax.Array]
METHODS = ("jacobian", "ntvp", "neural_tangents")


def response_logprob(logits: jax.Array, batch: Batch) -> jax.Array:
    """Sum of log-probabilities of each example's target (response) tokens: [B]."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.promote_types(logits.dtype, jnp.float32)), axis=-1)
    token = jnp.take_along_axis(logp, batch["input_ids"][:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(token * batch["loss_mask"][:, 1:], axis=-1)


def last_token_logits(vocab_ids: Sequence[int]) -> Readout:
    """Logits of the given vocabulary ids at each example's last real token: [B, len(vocab_ids)]."""
    ids = jnp.asarray(vocab_ids, jnp.int32)

    def readout(logits: jax.Array, batch: Batch) -> jax.Array:
        last = jnp.sum(batch["attention_mask"], axis=-1) - 1  # right padding
        return jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0][:, ids].astype(jnp.float32)

    return readout


def _example_fn(params0: Params, config: ModelConfig, readout: Readout):
    """f(scope_params, example) -> [O]: the readout of one example (dict of [T] rows)."""

    def f(sub: Params, example: Batch) -> jax.Array:
        batch = {k: v[None] for k, v in example.items()}
        out = readout(forward({**params0, **sub}, config, batch["input_ids"], batch["attention_mask"]), batch)
        return jnp.reshape(out[0], (-1,))

    return f


@functools.partial(jax.jit, static_argnames=("config", "readout"))
def _ntk_jacobian(params0, sub, config, readout, batch1, batch2):
    f = _example_fn(params0, config, readout)
    jac = jax.vmap(jax.jacrev(f), in_axes=(None, 0))
    j1, j2 = jac(sub, batch1), jac(sub, batch2)  # leaves [N, O, *shape]
    parts = [jnp.einsum("aox,bpx->abop", a.reshape(*a.shape[:2], -1), b.reshape(*b.shape[:2], -1),
                        preferred_element_type=jnp.float32) for a, b in zip(jax.tree.leaves(j1), jax.tree.leaves(j2))]
    return sum(parts)


@functools.partial(jax.jit, static_argnames=("config", "readout"))
def _ntk_ntvp(params0, sub, config, readout, batch1, batch2):
    f = _example_fn(params0, config, readout)
    width = jax.eval_shape(f, sub, jax.tree.map(lambda x: x[0], batch1)).shape[0]

    def column(example2):  # Θ(·, x2) for one x2: [O_p, N1, O_o]
        _, pullback = jax.vjp(lambda s: f(s, example2), sub)

        def for_output(e):
            (v,) = pullback(e)
            return jax.vmap(lambda ex1: jax.jvp(lambda s: f(s, ex1), (sub,), (v,))[1])(batch1)

        return jax.vmap(for_output)(jnp.eye(width, dtype=jnp.float32))

    cols = jax.lax.map(column, batch2)  # [N2, O_p, N1, O_o]
    return jnp.transpose(cols, (2, 0, 3, 1))


@functools.partial(jax.jit, static_argnames=("config", "readout"))
def _ntk_neural_tangents(params0, sub, config, readout, batch1, batch2):
    nt = neural_tangents_module()
    f = _example_fn(params0, config, readout)
    fn = nt.empirical_ntk_fn(lambda s, x: jax.vmap(lambda ex: f(s, ex))(x), trace_axes=(), vmap_axes=0,
                             implementation=nt.NtkImplementation.JACOBIAN_CONTRACTION)
    return fn(batch1, batch2, sub)


def neural_tangents_module():
    """The `neural_tangents` module (through `nt_compat`), or a MissingExtraError (an ImportError) that says
    why and what to use instead."""
    try:
        return import_neural_tangents()
    except ImportError as e:  # not installed, frozendict missing, or a JAX name nt_compat does not restore
        raise MissingExtraError(f"neural-tangents is unavailable ({type(e).__name__}: {e}); install it with `pip "
                                "install frozendict && pip install --no-deps neural-tangents==0.6.5` (the `ntk` "
                                "extra, README), or use method='jacobian' or 'ntvp', which compute the same "
                                "kernel") from e


def empirical_ntk(model0, scope: Scope, batch1: Batch, batch2: Batch | None = None,
                  readout: Readout = response_logprob, method: str = "jacobian", chunk: int = 8) -> jax.Array:
    """Θ(batch1, batch2) over the scope's tensors at θ0 = model0.params; [N1, N2] or [N1, N2, O, O].

    Examples are processed `chunk` at a time per side, so memory grows with the chunk, not N.
    """
    if method not in METHODS:
        raise EnchtableError(f"unknown NTK method {method!r}; choose one of {', '.join(METHODS)}")
    kernel_fn = {"jacobian": _ntk_jacobian, "ntvp": _ntk_ntvp, "neural_tangents": _ntk_neural_tangents}[method]
    batch2 = batch1 if batch2 is None else batch2
    b1, b2 = ({k: jnp.asarray(v) for k, v in b.items()} for b in (batch1, batch2))
    sub = {n: model0.params[n] for n in scope.params}
    n1, n2 = b1["input_ids"].shape[0], b2["input_ids"].shape[0]
    c1, c2 = min(chunk, n1), min(chunk, n2)
    p1, p2 = _pad_rows(b1, c1), _pad_rows(b2, c2)  # equal chunks: one compilation
    rows = []
    for i in range(0, n1, c1):
        part1 = {k: v[i:i + c1] for k, v in p1.items()}
        rows.append(jnp.concatenate([kernel_fn(model0.params, sub, model0.config, readout, part1,
                                               {k: v[j:j + c2] for k, v in p2.items()})
                                     for j in range(0, n2, c2)], axis=1))
    kernel = jnp.concatenate(rows, axis=0)[:n1, :n2]
    return kernel[:, :, 0, 0] if kernel.shape[2] == 1 else kernel


def _pad_rows(batch: Batch, chunk: int) -> Batch:
    """Repeat the last example so the number of rows is a multiple of `chunk`."""
    n = batch["input_ids"].shape[0]
    extra = -n % chunk
    return {k: jnp.concatenate([v, jnp.repeat(v[-1:], extra, axis=0)]) if extra else v for k, v in batch.items()}


def _as_matrix(kernel: jax.Array) -> np.ndarray:
    k = np.asarray(kernel, np.float64)
    if k.ndim == 4:  # [N1, N2, O, O] -> [N1*O, N2*O]
        k = k.transpose(0, 2, 1, 3).reshape(k.shape[0] * k.shape[2], k.shape[1] * k.shape[3])
    return k


def kernel_overlap(k_hh: jax.Array, k_tt: jax.Array, k_ht: jax.Array) -> dict[str, float]:
    """How much harmful (h) and task (t) examples share kernel directions.

    alignment = ‖Θ_ht‖_F / sqrt(‖Θ_hh‖_F ‖Θ_tt‖_F) ∈ [0, 1] (Cauchy–Schwarz on J_hᵀJ_h, J_tᵀJ_t);
    task_energy_in_harmful_span = tr(Θ_th Θ_hh⁺ Θ_ht) / tr(Θ_tt) ∈ [0, 1]: the share of the task
    gradients' energy inside the span of the harmful gradients; mean_abs_cosine over example pairs.
    """
    hh, tt, ht = _as_matrix(k_hh), _as_matrix(k_tt), _as_matrix(k_ht)
    alignment = np.linalg.norm(ht) / np.sqrt(np.linalg.norm(hh) * np.linalg.norm(tt))
    energy = np.trace(ht.T @ np.linalg.pinv(hh, rcond=1e-10, hermitian=True) @ ht) / np.trace(tt)
    cosine = ht / np.sqrt(np.outer(np.diag(hh), np.diag(tt)))
    return {"alignment": float(alignment), "task_energy_in_harmful_span": float(energy),
            "mean_abs_cosine": float(np.mean(np.abs(cosine)))}


def ntk_overlap(model0, scope: Scope, harmful: Batch, task: Batch, readout: Readout = response_logprob,
                method: str = "ntvp") -> dict[str, float]:
    """The `kernel_overlap` diagnostic computed from the model on a harmful and a task batch."""
    k = functools.partial(empirical_ntk, model0, scope, readout=readout, method=method)
    return kernel_overlap(k(harmful), k(task), k(harmful, task))


__all__ = ["METHODS", "Readout", "empirical_ntk", "kernel_overlap", "last_token_logits", "neural_tangents_module",
           "ntk_overlap", "response_logprob"]
