"""The linearized forward: f(θ0) + J(θ0)(θ − θ0) over a scope, by `jax.jvp`.

Every unit of the scope is evaluated as one `jax.jvp` at θ0 with tangent θ − θ0 (primal and
tangent in one pass) and returns primal + tangent; units outside the scope run at θ0. The
`whole_model` scope does the same for the entire network. Only the scope's tensors are passed as
θ, so only they exist twice in memory. θ0 sets the compute dtype (e.g. bfloat16) while θ may be
float32 master weights.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

from enchtable_jax.kernels.scopes import Scope, resolve_scope, unit_params
from enchtable_jax.models.config import ModelConfig
from enchtable_jax.models.transformer import Params, call_unit, forward


def tangent(params0: Params, params: Params, names) -> dict[str, jax.Array]:
    """θ − θ0 for `names`, formed in θ's precision and then cast to θ0's compute dtype.

    With float32 master weights θ and bfloat16 θ0, the difference keeps updates far below bfloat16's
    resolution of θ itself (bf16(θ) − θ0 would round a 1e-5 step away).
    """
    return {n: (params[n] - params0[n].astype(params[n].dtype)).astype(params0[n].dtype) for n in names}


def linearized_unit(params0: Params, params: Params, owned: Mapping[str, tuple[str, ...]]):
    """A `Unit` that replaces each unit in `owned` by its first-order expansion around `params0`."""

    def unit(name: str, fn: Callable[[Params], jax.Array], current: Params) -> jax.Array:
        names = owned.get(name)
        if not names:
            return call_unit(name, fn, current)
        primal = {n: params0[n] for n in names}
        out, dout = jax.jvp(lambda sub: fn({**current, **sub}), (primal,), (tangent(params0, params, names),))
        return out + dout

    return unit


def linearized_forward(params0: Params, params: Params, config: ModelConfig, scope: Scope, input_ids: jax.Array,
                       attention_mask: jax.Array | None = None) -> jax.Array:
    """Logits of the model linearized in `scope` around `params0`, at the scope tensors `params` (pure)."""
    if scope.whole_model:
        primal = {n: params0[n] for n in scope.params}
        out, dout = jax.jvp(lambda sub: forward({**params0, **sub}, config, input_ids, attention_mask),
                            (primal,), (tangent(params0, params, scope.params),))
        return out + dout
    unit = linearized_unit(params0, params, unit_params(scope))
    return forward(params0, config, input_ids, attention_mask, unit=unit)


_linearized_forward = jax.jit(linearized_forward, static_argnames=("config", "scope"))


def linearized_logits(model0, params: Params, input_ids, scope: Scope | str, attention_mask=None,
                      layers: str | None = None) -> jax.Array:
    """f(θ0) + J(θ0)(θ − θ0) for `model0` (θ0) at `params` (θ: the scope's tensors; others are ignored).

    `scope` is a resolved `Scope` or a name such as 'ffn', 'attn_block+ffn' (with `layers` like '12:-12').
    """
    if isinstance(scope, str):
        scope = resolve_scope(model0.config, scope, layers)
    missing = [n for n in scope.params if n not in params]
    if missing:
        raise KeyError(f"params lacks scope tensor(s) {missing[:3]}; pass θ for every tensor of scope {scope.name}")
    input_ids = jnp.asarray(input_ids, jnp.int32)
    mask = jnp.ones_like(input_ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    return _linearized_forward(model0.params, {n: params[n] for n in scope.params}, model0.config, scope,
                               input_ids, mask)


def scope_params(params0: Params, scope: Scope) -> dict[str, jax.Array]:
    """θ0 restricted to the scope: the starting point of distillation (copied, so it can be donated)."""
    return {n: jnp.array(params0[n], copy=True) for n in scope.params}
