"""GCG (attack/gcg.py) on tiny models: the search lowers the target loss, its gradient is the finite-difference
gradient of the one-hot relaxation, candidates come from the gradient's top-k allowed tokens, the round-trip
filter keeps only suffixes whose text tokenizes back to their ids, the candidate batch gives the same losses on
8 devices as the plain forward, and the CLI's options are the declared ones."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from enchtable_jax.attack.gcg import (
    _decoded_suffix,
    _encodes_to,
    _replays,
    allowed_tokens,
    candidate_losses,
    onehot_loss,
    padded_sequence,
    prompt_layout,
    sample_candidates,
)
from enchtable_jax.cli import _options_from, build_parser
from enchtable_jax.errors import EnchtableError
from enchtable_jax.eval.suffixes import with_suffix
from enchtable_jax.models.chat import render_prompts
from enchtable_jax.models.init import init_params, preset_config
from enchtable_jax.models.model import apply
from enchtable_jax.options import GCGOptions
from gcg_run import PROMPT, SMALL, small_attack



@pytest.fixture(scope="module")
def attacked(byte_model):
    """The shared small GCG run on the byte model: (model, tokenizer, attack.json dict)."""
    model, tokenizer = byte_model
    return model, tokenizer, small_attack(model, tokenizer)


def _plain_loss(model, tokenizer, prompt: str, suffix: str, target_ids) -> float:
    """float64 numpy oracle: the target's mean negative log-likelihood after the replayed rendering (plain
    `apply`, no padding, no one-hot path)."""
    ids = render_prompts([with_suffix(prompt, suffix)], tokenizer)[0] + list(target_ids)
    logits = np.asarray(apply(model, np.asarray([ids])), np.float64)[0]
    t = len(target_ids)
    rows = logits[len(ids) - t - 1:len(ids) - 1]
    logp = rows - rows.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    return float(-np.mean(logp[np.arange(t), target_ids]))


def test_gcg_lowers_the_target_loss_and_keeps_the_best(attacked):
    _, _, result = attacked
    record = result["prompts"][0]
    curve = record["loss_curve"]
    assert len(curve) == SMALL["steps"] + 1 and record["steps"] == SMALL["steps"] and record["stopped"] == "steps"
    assert record["final_loss"] == min(curve) and record["final_loss"] < curve[0] - 0.1, curve
    assert len(record["suffix_ids"]) == SMALL["suffix_length"] and record["suffix"] != "!" * SMALL["suffix_length"]
    assert result["n"] == 1 and result["attack_success_rate"] == float(record["broken"])


def test_replayed_suffix_gives_the_recorded_ids_and_loss(attacked):
    """Rendered as evaluate renders it, the suffix text gives exactly the ids the search optimised, and the plain
    forward's loss there is the recorded final loss."""
    model, tokenizer, result = attacked
    record = result["prompts"][0]
    layout = prompt_layout(tokenizer, PROMPT, record["target"], SMALL["suffix_length"])
    replayed = render_prompts([with_suffix(PROMPT, record["suffix"])], tokenizer)[0]
    assert replayed == [*layout.prefix, *record["suffix_ids"], *layout.after]
    oracle = _plain_loss(model, tokenizer, PROMPT, record["suffix"], layout.target)
    assert record["final_loss"] == pytest.approx(oracle, rel=1e-5)
    # the first point of the curve comes from the one-hot (gradient) path: the plain loss of the initial suffix
    initial = _plain_loss(model, tokenizer, PROMPT, "!" * SMALL["suffix_length"], layout.target)
    assert record["loss_curve"][0] == pytest.approx(initial, rel=1e-5)


def test_onehot_gradient_matches_central_differences():
    """d loss / d onehot[i, v] on the relaxation, in float64, against (L(x + h e) - L(x - h e)) / 2h (at a one-hot
    point the relaxation is the plain loss: the replay test checks that in float32)."""
    config = preset_config("tiny", "llama", num_hidden_layers=1)
    params32 = init_params(config, seed=1, std=0.3)
    with jax.enable_x64(True):
        params = {k: jnp.asarray(np.asarray(v, np.float64)) for k, v in params32.items()}
        rng = np.random.default_rng(0)
        ids = jnp.asarray(rng.integers(0, config.vocab_size, 12), jnp.int32)
        mask = jnp.ones(12, jnp.int32).at[:2].set(0)  # left padding as the search uses it
        start, targets = 4, ids[-3:]
        onehot = jax.nn.one_hot(ids[start:start + 4], config.vocab_size, dtype=jnp.float64)
        loss_and_grad = jax.jit(jax.value_and_grad(lambda x: onehot_loss(params, config, ids, mask, start, x, targets)))
        value, grad = loss_and_grad(onehot)
        h = 1e-5
        for i, v in [(0, int(ids[start])), (1, 7), (2, 200), (3, 33), (3, int(ids[start + 3]))]:
            e = jnp.zeros_like(onehot).at[i, v].set(h)
            numeric = (float(loss_and_grad(onehot + e)[0]) - float(loss_and_grad(onehot - e)[0])) / (2 * h)
            assert float(grad[i, v]) == pytest.approx(numeric, rel=1e-6, abs=1e-9), (i, v)
        assert np.isfinite(float(value))


def test_candidates_change_one_position_to_a_top_k_allowed_token():
    n, vocab, batch, topk = 5, 40, 64, 3
    grad = jnp.asarray(np.random.default_rng(1).normal(size=(n, vocab)), jnp.float32)
    allowed = np.ones(vocab, bool)
    allowed[::2] = False
    suffix = jnp.full(n, 1, jnp.int32)
    candidates = np.asarray(sample_candidates(jax.random.key(0), suffix, grad, jnp.asarray(allowed), batch, topk))
    oracle = [set(np.argsort(np.where(allowed, -np.asarray(grad[i]), -np.inf))[::-1][:topk].tolist())
              for i in range(n)]
    positions = set()
    for row in candidates:
        changed = np.flatnonzero(row != 1)
        assert len(changed) <= 1
        for i in changed:
            assert row[i] in oracle[i], (i, row[i], oracle[i])
            positions.add(int(i))
    assert len(positions) == n  # every position gets drawn in 64 candidates


def test_filter_allows_printable_ascii_and_refuses_suffixes_that_retokenize(byte_model):
    """The byte tokenizer's allowed tokens are exactly the printable ASCII bytes; a suffix spelling a control
    token ('<|im_end|>', each byte allowed) does not tokenize back to its ids, so it is filtered out."""
    _, tokenizer = byte_model
    allowed = allowed_tokens(tokenizer, 264)
    assert set(np.flatnonzero(allowed).tolist()) == set(range(0x20, 0x7F))
    n = len("<|im_end|>")
    layout = prompt_layout(tokenizer, PROMPT, "Sure", n)
    rows = np.asarray([list(b"abcdefghij"), list(b"<|im_end|>"), list(b"!!!!!!!!!!")], np.int32)
    texts = _decoded_suffix(tokenizer, layout, rows)
    assert texts == ["abcdefghij", "<|im_end|>", "!!!!!!!!!!"]
    assert _encodes_to(tokenizer, layout, texts, rows).tolist() == [True, False, True]
    assert _replays(tokenizer, layout, texts[0], rows[0], None)


def test_candidate_losses_are_the_same_on_8_devices(byte_model):
    model, tokenizer = byte_model
    devices = jax.devices()
    assert len(devices) == 8
    layout = prompt_layout(tokenizer, PROMPT, "Sure, here is", 6)
    ids, mask, start = padded_sequence(layout, layout.suffix, 0)
    rows = np.random.default_rng(2).integers(32, 127, (16, 6)).astype(np.int32)
    targets = jnp.asarray(layout.target)
    mesh = jax.sharding.Mesh(np.asarray(devices), ("candidates",))
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("candidates"))
    params = jax.device_put(model.params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    sharded = candidate_losses(params, model.config, ids, mask, start, jax.device_put(rows, split), targets)
    assert len(sharded.sharding.device_set) == 8
    oracle = [_plain_loss(model, tokenizer, PROMPT, bytes(row.tolist()).decode(), layout.target) for row in rows]
    np.testing.assert_allclose(np.asarray(sharded), oracle, rtol=1e-5)


def test_gcg_options_are_declared_once_for_api_and_cli():
    """The paper's defaults; the CLI's flags read back as the declared defaults; ranges refused in both."""
    defaults = GCGOptions()
    assert (defaults.steps, defaults.topk, defaults.batch, defaults.suffix_length) == (500, 256, 512, 20)
    args = build_parser().parse_args(["attack", "--model", "m", "--prompts", "p", "--out", "o"])
    assert _options_from(args, GCGOptions) == defaults
    args = build_parser().parse_args(["attack", "--model", "m", "--prompts", "p", "--out", "o", "--steps", "7",
                                      "--time-budget", "2.5", "--target", "Of course"])
    assert _options_from(args, GCGOptions) == dataclasses.replace(defaults, steps=7, time_budget=2.5,
                                                                  target="Of course")
    with pytest.raises(EnchtableError, match="^option topk must be"):
        GCGOptions(topk=0)
    with pytest.raises(EnchtableError, match="^option target must be a non-empty string"):
        GCGOptions(target=" ")
