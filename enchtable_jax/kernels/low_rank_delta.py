"""Δ of a scope's matrices trained as scale·B·A (LoRA-style), for a low-rank safety vector.

Each 2-D tensor of the scope, HF (out, in) layout m × n, trains B [m, r] and A [r, n] in place of Δ, with
PEFT's initialisation (A uniform in ±1/√n, i.e. kaiming-uniform with a = √5; B = 0, so Δ starts at 0) and
scale α/r. The scope's vectors (norm weights, biases) are trained in full, as plain Δ (VECTORS). The step
differentiates through `dense_delta`, so the factors' gradients are the chain rule of Δ's gradient G:
scale·G Aᵀ for B and scale·Bᵀ G for A.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from enchtable_jax.errors import EnchtableError
from enchtable_jax.kernels.scopes import Scope
from enchtable_jax.models.transformer import Params

B, A = "lora_B", "lora_A"  # PEFT's names of the factors
VECTORS = "full"  # how the scope's 1-D tensors train under a rank: as full Δ (not frozen)
Trained = dict[str, jax.Array | dict[str, jax.Array]]  # Δ of a vector, or {B: ..., A: ...} of a matrix


@dataclasses.dataclass(frozen=True)
class LowRank:
    """Rank r and α of the factors; Δ = (α/r)·B·A."""

    rank: int
    alpha: float

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def check_rank(params0: Params, scope: Scope, rank: int) -> None:
    """Refuse a rank outside [1, min(m, n)] of some matrix of the scope (one line naming --lora-rank)."""
    for name in scope.params:
        shape = params0[name].shape
        if len(shape) == 2 and not 1 <= rank <= min(shape):
            raise EnchtableError(f"option lora_rank (--lora-rank) must be an integer in [1, {min(shape)}] for "
                                 f"{name} of shape {tuple(shape)} in scope {scope.name}, got {rank}")


def init_factors(params0: Params, scope: Scope, rank: int, seed: int) -> Trained:
    """The starting point (Δ = 0): {B: 0, A: PEFT's uniform} per matrix of the scope, zero per vector (float32)."""
    trained: Trained = {}
    for i, name in enumerate(scope.params):
        shape = params0[name].shape
        if len(shape) != 2:
            trained[name] = jnp.zeros(shape, jnp.float32)
            continue
        bound = 1.0 / shape[1] ** 0.5
        trained[name] = {B: jnp.zeros((shape[0], rank), jnp.float32),
                         A: jax.random.uniform(jax.random.fold_in(jax.random.key(seed), i), (rank, shape[1]),
                                               jnp.float32, -bound, bound)}
    return trained


def dense_delta(trained: Trained, scale: float) -> Params:
    """Δ of every tensor: scale·B·A for a matrix, Δ itself for a vector (pure; differentiated through)."""
    return {n: scale * (v[B] @ v[A]) if isinstance(v, dict) else v for n, v in trained.items()}
