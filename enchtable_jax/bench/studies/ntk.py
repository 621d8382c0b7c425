"""Study: the empirical NTK Θ(x, x) of one batch against itself, in examples per second.

Implementations (alternating in this process, compilation excluded), all over the same scope at θ0 with
the `response_logprob` readout (one number per example, so Θ is N×N):
- jacobian: `kernels.ntk.empirical_ntk(method="jacobian")`, per-example reverse-mode Jacobians contracted;
- ntvp: `method="ntvp"`, NTK-vector products (one vjp, then jvps), never forming J;
- neural_tangents: its `empirical_ntk_fn` (Jacobian contraction, the same algorithm as ours), imported through
  `kernels/nt_compat.py`; where it is not installed the study records why under `unavailable`.
Sizes: `--quick` the tiny preset, 4 examples x 16 tokens; full: SmolLM2-135M's shape, 8 examples x 32
tokens, scope `ffn` (80M parameters), processed in chunks of 4 examples per side. examples/s = N /
seconds for the N×N kernel. `max_relative_difference` checks that the implementations computed the same
kernel (max |Θ_a − Θ_jacobian| / max |Θ_jacobian|).
"""

from __future__ import annotations

import jax
import numpy as np

from enchtable_jax import api
from enchtable_jax.bench.studies.linearize import token_batch
from enchtable_jax.bench.timing import alternate, rate, ratio, summary
from enchtable_jax.kernels.ntk import empirical_ntk, neural_tangents_module
from enchtable_jax.kernels.scopes import resolve_scope
from enchtable_jax.models.init import init_params, preset_config


SIZES = {"tiny": (4, 16, 4), "smollm2-135m": (8, 32, 4)}  # preset: (examples, tokens, chunk); `--quick` the first


def run(quick: bool = False, repeats: int | None = None, scope_name: str = "ffn", size: str | None = None) -> dict:
    preset = size or ("tiny" if quick else "smollm2-135m")
    examples, tokens, chunk = SIZES[preset]
    repeats = repeats or 3
    config = preset_config(preset)
    model = api.Model(config, init_params(config, seed=0))
    scope = resolve_scope(config, scope_name)
    batch = token_batch(config.vocab_size, examples, tokens)
    kernels: dict[str, jax.Array] = {}

    def kernel_fn(method: str):
        def compute():
            kernels[method] = jax.block_until_ready(empirical_ntk(model, scope, batch, method=method, chunk=chunk))

        return compute

    methods = ["jacobian", "ntvp"]
    unavailable = {}
    try:
        neural_tangents_module()
        methods.append("neural_tangents")
    except ImportError as e:
        unavailable["neural_tangents"] = str(e)
    times = alternate({m: kernel_fn(m) for m in methods}, repeats)
    reference = np.asarray(kernels["jacobian"], np.float64)
    scale = np.max(np.abs(reference))
    figures = {
        "preset": preset, "scope": scope_name, "batch": [examples, tokens], "repeats": repeats, "chunk": chunk,
        "setup": f"{preset}, scope {scope_name} ({sum(int(np.prod(model.params[n].shape)) for n in scope.params):,} "
                 f"parameters), {examples} examples x {tokens} tokens, chunks of {chunk}, {repeats} repeats",
        "seconds": {m: summary(t) for m, t in times.items()},
        "examples_per_second": {m: rate(examples, t) for m, t in times.items()},
        "max_relative_difference": {m: float(np.max(np.abs(np.asarray(k, np.float64) - reference)) / scale)
                                    for m, k in kernels.items() if m != "jacobian"},
        "ntvp_over_jacobian": ratio(times["ntvp"], times["jacobian"]),
        "samples": times,
    }
    if "neural_tangents" in times:
        figures["neural_tangents_over_jacobian"] = ratio(times["neural_tangents"], times["jacobian"])
    if unavailable:
        figures["unavailable"] = unavailable
    return figures


def markdown(figures: dict) -> list[str]:
    """Agreement of the kernels (relative to the largest entry of the Jacobian-contraction kernel)."""
    return ["Largest |Θ − Θ_jacobian| / max |Θ_jacobian|: "
            + ", ".join(f"{m} {d:.3g}" for m, d in figures["max_relative_difference"].items()) + "."]
