"""Study: one linearized training step vs a plain step of the same scope vs PyTorch's torch.func.jvp.

SmolLM2-135M shape (random weights), batch 4 x 128 tokens, scope `ffn`, AdamW; `--quick` uses the
tiny preset. All three run in the same process and alternate.
"""

from __future__ import annotations

import importlib.util

import jax
import numpy as np
import optax

from enchtable_jax.bench.timing import alternate, ratio, summary
from enchtable_jax.kernels.linearize import zero_delta
from enchtable_jax.kernels.scopes import resolve_scope
from enchtable_jax.kernels.train_step import init_opt_state, make_train_step
from enchtable_jax.models.init import init_params, preset_config

LR = 1e-5


def _batch(vocab: int, batch: int, tokens: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (batch, tokens)).astype(np.int32)
    mask = np.ones_like(ids)
    loss_mask = mask.copy()
    loss_mask[:, : tokens // 4] = 0  # a prompt quarter that is not trained on
    return {"input_ids": ids, "attention_mask": mask, "loss_mask": loss_mask}


def _jax_step(config, params0, scope, batch, linearized: bool):
    optimizer = optax.adamw(LR)
    state = {"params": zero_delta(params0, scope)}
    state["opt"] = init_opt_state(optimizer, state["params"])
    step = make_train_step(config, scope, optimizer, linearized=linearized)
    device_batch = jax.device_put(batch)

    def run():
        state["params"], state["opt"], metrics = step(params0, state["params"], state["opt"], device_batch)
        jax.block_until_ready(metrics["loss"])

    return run


def run(quick: bool = False, repeats: int | None = None, scope_name: str = "ffn") -> dict:
    preset, (batch_size, tokens) = ("tiny", (4, 32)) if quick else ("smollm2-135m", (4, 128))
    repeats = repeats or (3 if quick else 5)
    config = preset_config(preset)
    params0 = init_params(config, seed=0)
    scope = resolve_scope(config, scope_name)
    batch = _batch(config.vocab_size, batch_size, tokens)
    fns = {"jax_linearized": _jax_step(config, params0, scope, batch, True),
           "jax_plain": _jax_step(config, params0, scope, batch, False)}
    if importlib.util.find_spec("torch") is not None:
        from enchtable_jax.bench.torch_reference import make_torch_train_step, to_torch

        torch_step = make_torch_train_step(config, scope, to_torch(params0), lr=LR, linearized=True)
        fns["torch_linearized"] = lambda: torch_step.step(batch)
    times = alternate(fns, repeats)
    tokens_per_step = batch_size * tokens
    figures = {
        "preset": preset, "scope": scope_name, "batch": [batch_size, tokens], "repeats": repeats,
        "seconds": {name: summary(t) for name, t in times.items()},
        "tokens_per_second": {name: summary([tokens_per_step / s for s in t]) for name, t in times.items()},
        "linearized_over_plain": ratio(times["jax_linearized"], times["jax_plain"]),
    }
    if "torch_linearized" in times:
        figures["linearized_speedup_vs_torch"] = ratio(times["torch_linearized"], times["jax_linearized"])
    return figures
