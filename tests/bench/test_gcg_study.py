"""The GCG speed study (bench/studies/gcg.py) and its PyTorch side (benchmarks/torch_gcg.py): the plain PyTorch step
computes our attack's loss, one-hot gradient and candidate losses on the same model (transformers' forward against
ours), samples candidates as GCG does and filters those that do not re-tokenize; (slow) the quick study end to end."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax.sharding import Mesh, NamedSharding, PartitionSpec

from enchtable_jax.attack.gcg import CANDIDATES, _loss_and_grad, allowed_tokens, candidate_losses, padded_sequence, \
    prompt_layout
from enchtable_jax.bench.optional import reference_module
from gcg_run import PROMPT, SMALL


@pytest.fixture(scope="module")
def torch_side(byte_model):
    """(our model, tokenizer, layout, allowed, TorchGCG on the same folder) for the suffix length of the attack
    tests' small run (tests/gcg_run.py), whose compiled programs the comparison below reuses."""
    torch_gcg, missing = reference_module("torch_gcg")
    if torch_gcg is None:
        pytest.skip(missing)
    model, tokenizer = byte_model
    layout = prompt_layout(tokenizer, PROMPT, "Sure, here is", SMALL["suffix_length"])
    allowed = allowed_tokens(tokenizer, model.config.vocab_size)
    torch_model, torch_tokenizer = torch_gcg.load(model.source)
    side = torch_gcg.TorchGCG(torch_model, torch_tokenizer, layout.prefix, layout.suffix, layout.after, layout.target,
                              allowed, topk=8, batch=32, seed=0)
    return model, tokenizer, layout, allowed, side, torch_gcg


def test_torch_step_computes_our_loss_gradient_and_candidate_losses(torch_side):
    """transformers' forward (torch's side) against the attack's own jitted programs, placed as `search` places them."""
    model, tokenizer, layout, _, side, torch_gcg = torch_side
    mesh = Mesh(np.asarray(jax.devices()[:1]), (CANDIDATES,))
    params = jax.device_put(model.params, NamedSharding(mesh, PartitionSpec()))
    ids, mask, start = padded_sequence(layout, layout.suffix, 0)
    targets = jnp.asarray(layout.target)
    onehot = jax.nn.one_hot(np.asarray(layout.suffix), model.config.vocab_size, dtype=jnp.float32)
    loss, grad = _loss_and_grad(params, model.config, ids, mask, start, onehot, targets)
    torch_loss, torch_grad = side.loss_and_grad(side.suffix)
    assert torch_loss == pytest.approx(float(loss), rel=1e-5)
    np.testing.assert_allclose(torch_grad.numpy(), np.asarray(grad), rtol=1e-4, atol=1e-5 * float(jnp.abs(grad).max()))
    rows = np.random.default_rng(0).integers(0x20, 0x7F, (SMALL["batch"], len(layout.suffix))).astype(np.int32)
    ours = candidate_losses(params, model.config, ids, mask, start,
                            jax.device_put(rows, NamedSharding(mesh, PartitionSpec(CANDIDATES))), targets)
    np.testing.assert_allclose(side.candidate_losses(side.suffix.new_tensor(rows)).numpy(), np.asarray(ours),
                               rtol=1e-5)
    # transformers' own chat-template rendering gives the ids both sides run
    assert torch_gcg.render(side.tokenizer, PROMPT + " " + "!" * SMALL["suffix_length"]) == layout.prompt_ids


def test_torch_candidates_change_one_position_to_a_top_k_allowed_token_and_the_filter_drops_round_trips(torch_side):
    _, _, layout, allowed, side, _ = torch_side
    _, grad = side.loss_and_grad(side.suffix)
    g = grad.numpy()
    top = [set(np.argsort(np.where(allowed, -g[i], -np.inf))[::-1][:side.topk].tolist()) for i in range(len(g))]
    suffix = np.asarray(layout.suffix)
    candidates = side.candidates(side.suffix, grad).numpy()
    assert candidates.shape == (side.batch, len(suffix))
    for row in candidates:
        changed = np.flatnonzero(row != suffix)
        assert len(changed) <= 1 and all(row[i] in top[i] for i in changed)
    rows = side.suffix.new_tensor([list(b"ab!cde"), list(b"<|im_e"), list(b"!!!!!!")])
    assert side.keep(rows).tolist() == [True, True, True]  # bytes round-trip alone
    rows = side.suffix.new_tensor([list(b"<|im_end|>"), list(b"!!!!!!!!!!")])
    assert side.keep(rows).tolist() == [False, True]  # the special token is one id when encoded again


@pytest.mark.slow
def test_quick_study_times_both_sides_and_they_agree(tmp_path):
    """The quick study end to end (two server processes, ~40 s on 2 cores): every figure, the agreement small."""
    from enchtable_jax.bench import __main__ as bench
    from enchtable_jax.bench.studies import gcg

    figures = gcg.run(quick=True, repeats=2)
    assert set(figures["seconds"]) == {"ours", "torch"} and len(figures["samples"]["ours"]) == 2
    assert figures["gcg_step_speedup_vs_torch"]["median"] > 0 and figures["compile_seconds"] > 0
    a = figures["agreement_with_torch"]
    assert a["same_rendering"] and a["topk_shared_fraction_min"] == 1.0
    assert a["grad_max_abs_over_max"] < 1e-4 and a["candidate_losses_max_abs_difference"] < 1e-4
    assert a["loss_abs_difference"] < 1e-4 * a["loss_torch"]
    values, goals = bench.targets({"gcg": figures})
    assert values["gcg_step_speedup_vs_torch"] == figures["gcg_step_speedup_vs_torch"]["median"]
    assert goals["gcg_step_speedup_vs_torch"]["goal"] == ">= 1"
