"""Fixtures of the evaluation tests: the shared real data sets, a tiny byte-level chat model, and a rigged one
that writes a fixed answer."""

from __future__ import annotations

import itertools
from pathlib import Path

import jax.numpy as jnp
import pytest

import enchtable_jax
from enchtable_jax.api import Model
from enchtable_jax.models.init import init_params, preset_config
from enchtable_jax.models.tokenizer import byte_level_tokenizer

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The read-only evaluation data beside the repository (../shared/data); skips when it is absent."""
    folder = (REPO / ".." / "shared" / "data").resolve()
    if not (folder / "refusal_labels.csv").is_file():
        pytest.skip(f"shared evaluation data absent: expected {folder} (refusal_labels.csv, advbench.json) beside "
                    "the repository")
    return folder


@pytest.fixture(scope="session")
def byte_model(tmp_path_factory):
    """(model, tokenizer): a random tiny llama with the byte-level ChatML tokenizer saved beside it, as
    `enchtable init` writes it; weights large enough that greedy answers vary with the prompt."""
    folder = tmp_path_factory.mktemp("byte-model")
    config = preset_config("tiny", "llama")
    tokenizer = byte_level_tokenizer()
    tokenizer.save_pretrained(folder / "tokenizer")
    model = Model(config, init_params(config, seed=3, std=0.3))
    return enchtable_jax.load(enchtable_jax.save(model, folder / "model", like=folder / "tokenizer")), tokenizer


def _answering_model(text: str, after: str) -> Model:
    """A tiny byte-level llama that, after the byte `after`, greedily writes `text` then end-of-text.

    Attention and MLP outputs are zeroed, so each position's logits depend on its own token only (a bigram
    model); the embedding gives each needed token its own axis and the head maps it to its successor.
    """
    config = preset_config("tiny", "llama")
    params = init_params(config, seed=0, std=0.01)
    for name in params:
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            params[name] = jnp.zeros_like(params[name])
    chain = [ord(after), *text.encode(), 256]
    embed, head = params["model.embed_tokens.weight"], params["lm_head.weight"]
    for axis, (token, successor) in enumerate(itertools.pairwise(chain)):
        embed = embed.at[token].set(jnp.zeros(config.hidden_size).at[axis].set(1.0))
        head = head.at[successor].set(jnp.zeros(config.hidden_size).at[axis].set(10.0))
    return Model(config, {**params, "model.embed_tokens.weight": embed, "lm_head.weight": head})


@pytest.fixture(scope="session")
def answering_model():
    """Factory: answering_model(text, after) -> a rigged tiny model that writes `text` after the byte `after`."""
    return _answering_model
