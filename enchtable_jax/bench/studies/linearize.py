"""Study: one linearized training step vs a plain step of the same scope vs PyTorch's torch.func.jvp.

SmolLM2-135M shape (random weights), batch 4 x 128 tokens, scope `ffn`, AdamW; `--quick` uses the
tiny preset (4 x 32 tokens), `--size NAME` that preset. All three run in the same process and alternate.
Without torch the PyTorch side is reported as unavailable and the JAX figures are still measured.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np
import optax
from jax.sharding import Mesh

from enchtable_jax.bench.optional import reference_module
from enchtable_jax.bench.timing import alternate, rate, ratio, summary
from enchtable_jax.kernels.linearize import zero_delta
from enchtable_jax.kernels.mesh import batch_sharding, put_tree, shard_tree
from enchtable_jax.kernels.scopes import Scope, resolve_scope
from enchtable_jax.kernels.train_step import init_opt_state, make_train_step
from enchtable_jax.models.config import ModelConfig
from enchtable_jax.models.init import init_params, preset_config
from enchtable_jax.models.transformer import Params

LR = 1e-5
BATCHES = {"tiny": (4, 32), "smollm2-135m": (4, 128)}  # [examples, tokens] per preset (models.init)
SIZES = tuple(BATCHES)  # the presets `--size` may choose


def token_batch(vocab: int, batch: int, tokens: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random token ids, no padding; the first quarter of each row is prompt (not trained on)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (batch, tokens)).astype(np.int32)
    mask = np.ones_like(ids)
    loss_mask = mask.copy()
    loss_mask[:, : tokens // 4] = 0  # a prompt quarter that is not trained on
    return {"input_ids": ids, "attention_mask": mask, "loss_mask": loss_mask}


def jax_step(config: ModelConfig, params0: Params, scope: Scope, batch: dict[str, np.ndarray], linearized: bool,
             mesh: Mesh | None = None) -> Callable[[], None]:
    """A call that runs one AdamW step (`kernels.train_step`) on `batch` and blocks until it is done.

    With a `mesh`, θ0 and the batch are placed on it once, so that a call times the step, not transfers.
    """
    optimizer = optax.adamw(LR)
    if mesh is not None:
        params0 = shard_tree(params0, mesh)
        batch = {k: v[None] for k, v in batch.items()}  # the step's accumulation axis, so placing it once sticks
        device_batch = put_tree(batch, jax.tree.map(lambda _: batch_sharding(mesh, accumulation_axis=True), batch))
    else:
        device_batch = jax.device_put(batch)
    state = {"params": zero_delta(params0, scope)}
    state["opt"] = init_opt_state(optimizer, state["params"])
    step = make_train_step(config, scope, optimizer, linearized=linearized, mesh=mesh)

    def run():
        state["params"], state["opt"], metrics = step(params0, state["params"], state["opt"], device_batch)
        jax.block_until_ready(metrics["loss"])

    return run


def run(quick: bool = False, repeats: int | None = None, scope_name: str = "ffn", size: str | None = None) -> dict:
    preset = size or ("tiny" if quick else "smollm2-135m")
    batch_size, tokens = BATCHES[preset]
    repeats = repeats or (3 if quick else 5)
    config = preset_config(preset)
    params0 = init_params(config, seed=0)
    scope = resolve_scope(config, scope_name)
    batch = token_batch(config.vocab_size, batch_size, tokens)
    fns = {"jax_linearized": jax_step(config, params0, scope, batch, True),
           "jax_plain": jax_step(config, params0, scope, batch, False)}
    torch_reference, torch_missing = reference_module("torch_reference")
    if torch_reference is not None:
        torch_step = torch_reference.make_torch_train_step(config, scope, torch_reference.to_torch(params0), lr=LR,
                                                           linearized=True)
        fns["torch_linearized"] = lambda: torch_step.step(batch)
    times = alternate(fns, repeats)
    tokens_per_step = batch_size * tokens
    figures = {
        "preset": preset, "scope": scope_name, "batch": [batch_size, tokens], "repeats": repeats,
        "seconds": {name: summary(t) for name, t in times.items()},
        "tokens_per_second": {name: rate(tokens_per_step, t) for name, t in times.items()},
        "linearized_over_plain": ratio(times["jax_linearized"], times["jax_plain"]),
        "samples": times,
    }
    if torch_reference is None:
        figures["unavailable"] = {"torch_linearized": torch_missing}
    else:
        figures["linearized_speedup_vs_torch"] = ratio(times["torch_linearized"], times["jax_linearized"])
    return figures
