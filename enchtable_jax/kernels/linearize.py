"""The linearized forward: f(θ0) + J(θ0)(θ − θ0) over a scope, by `jax.jvp`.

Training works on the displacement Δ = θ − θ0 of the scope's tensors (zero at the start; the safety
vector is −Δ at the end): it is exactly the jvp tangent, so no θ − θ0 is formed per step, and
float32 Δ keeps updates far below the resolution of bfloat16 weights. Every unit of the scope is
evaluated as one `jax.jvp` at θ0 with tangent Δ (primal and tangent in one pass) and returns
primal + tangent; units outside the scope run at θ0. The `whole_model` scope does the same for the
entire network. θ0 sets the compute dtype (e.g. bfloat16); Δ may be float32.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

from enchtable_jax.kernels.scopes import Scope, check_reached, resolve_scope, unit_params
from enchtable_jax.models.config import ModelConfig
from enchtable_jax.models.transformer import Params, Unit, call_unit, forward


def tangent(params0: Params, delta: Params, names) -> dict[str, jax.Array]:
    """Δ for `names` in θ0's compute dtype (the jvp tangent must match its primal)."""
    return {n: delta[n].astype(params0[n].dtype) for n in names}


def linearized_unit(params0: Params, delta: Params, owned: Mapping[str, tuple[str, ...]]):
    """A `Unit` that replaces each unit in `owned` by its first-order expansion around `params0`."""

    def unit(name: str, fn: Callable[[Params], jax.Array], current: Params) -> jax.Array:
        names = owned.get(name)
        if not names:
            return call_unit(name, fn, current)
        primal = {n: params0[n] for n in names}
        out, dout = jax.jvp(lambda sub: fn({**current, **sub}), (primal,), (tangent(params0, delta, names),))
        return out + dout

    return unit


def scope_forward(params: Params, config: ModelConfig, scope: Scope, input_ids: jax.Array,
                  attention_mask: jax.Array | None = None, unit: Unit = call_unit) -> jax.Array:
    """`forward` through `unit`, refusing a scope with a unit the forward never passed to its seam.

    The seam calls are recorded while the forward is traced, so under jit the check runs once per
    compilation and costs nothing per step.
    """
    reached: set[str] = set()

    def recording(name: str, fn: Callable[[Params], jax.Array], current: Params) -> jax.Array:
        reached.add(name)
        return unit(name, fn, current)

    logits = forward(params, config, input_ids, attention_mask, unit=recording)
    check_reached(scope, reached)
    return logits


def linearized_forward(params0: Params, delta: Params, config: ModelConfig, scope: Scope, input_ids: jax.Array,
                       attention_mask: jax.Array | None = None) -> jax.Array:
    """Logits of the model linearized in `scope` around `params0`, displaced by `delta` (pure)."""
    if scope.whole_model:
        primal = {n: params0[n] for n in scope.params}
        out, dout = jax.jvp(lambda sub: forward({**params0, **sub}, config, input_ids, attention_mask),
                            (primal,), (tangent(params0, delta, scope.params),))
        return out + dout
    unit = linearized_unit(params0, delta, unit_params(scope))
    return scope_forward(params0, config, scope, input_ids, attention_mask, unit)


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
    delta = {n: params[n] - model0.params[n].astype(params[n].dtype) for n in scope.params}
    return _linearized_forward(model0.params, delta, model0.config, scope, input_ids, mask)


def zero_delta(params0: Params, scope: Scope, dtype=jnp.float32) -> dict[str, jax.Array]:
    """Δ = 0 on the scope's tensors: the starting point of distillation (float32 master values)."""
    return {n: jnp.zeros(params0[n].shape, dtype) for n in scope.params}
