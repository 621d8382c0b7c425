"""Batched text generation in JAX: chat-templated prompts, a key/value cache, greedy or seeded sampling.

A batch of prompts is left-padded to one width, written into the cache in one call (prefill), then
decoded one token per step inside a jitted `lax.while_loop` until every row has produced an
end-of-sequence id or `max_new_tokens` tokens. Prompt widths and batch sizes are rounded up to
buckets, so a run compiles once per (batch bucket, width bucket), not once per prompt. Prompts are
sorted by length before batching (less padding) and answers returned in the input order; a batch of long
prompts holds fewer rows (`batch_members`), so its attention scores stay within `MAX_ATTENTION_SCORES`.

Sampling draws each row from its own key, `fold_in(key(seed), prompt index)` then the step, so a
prompt's sample does not depend on which prompts share its batch (up to float rounding of padding).

The inference-time defenses of `eval/defenses.py` plug in here: Self-Reminder rewrites the conversations before
rendering; SafeDecoding runs a second (expert) model beside the first for its first m tokens, in the same loop.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from enchtable_jax.errors import EnchtableError
from enchtable_jax.eval.defenses import SelfReminder, check_expert, check_expert_width, remind, safedecoding_scores
from enchtable_jax.models.chat import Message, render_prompts
from enchtable_jax.models.config import ModelConfig
from enchtable_jax.models.model import Model
from enchtable_jax.models.tokenizer import load_tokenizer
from enchtable_jax.models.transformer import Params, forward_cached, init_cache
from enchtable_jax.options import SafeDecodingOptions
from enchtable_jax.safe_io import check_inside, read_json

MIN_WIDTH = 16  # smallest prompt-width bucket
# Attention scores a batch may hold per layer (rows x heads x prompt width x cache slots, float32: 1 GiB). Long
# prompts (jailbreak templates run to thousands of tokens) get fewer rows per batch: 64 rows of a 1,500-token
# prompt would ask XLA for 29 GB on a 0.5B model.
MAX_ATTENTION_SCORES = 2**28


def width_bucket(n: int) -> int:
    """Padded prompt width for a longest prompt of n tokens: 16, 24, 32, 48, 64, 96, ... (2^k or 1.5 * 2^k).

    Two buckets per doubling: at most a third of a batch's prefill is padding, and the number of
    compilations grows with the log of the longest prompt.
    """
    width = MIN_WIDTH
    while width < n:
        width = width * 3 // 2 if width & (width - 1) == 0 else width // 3 * 4
    return width


def batch_bucket(n: int, batch_size: int) -> int:
    """Rows of a batch holding n prompts: the next power of two, at most `batch_size`."""
    return min(batch_size, 1 << (max(n, 1) - 1).bit_length())


def batch_members(lengths: Sequence[int], batch_size: int, heads: int, max_new_tokens: int) -> list[list[int]]:
    """Prompt indices per batch, shortest prompts first: at most `batch_size` each, and fewer (a power of two, at
    least one) where the batch's bucket of rows at its longest member's width would hold more than
    `MAX_ATTENTION_SCORES` attention scores."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches, start = [], 0
    while start < len(order):
        rows = min(batch_size, len(order) - start)
        width = width_bucket(lengths[order[start + rows - 1]])
        fit = MAX_ATTENTION_SCORES // (heads * width * (width + max_new_tokens))
        if batch_bucket(rows, batch_size) > fit:  # the rows compiled: `rows` rounded up to its bucket
            rows = 1 << (max(fit, 1).bit_length() - 1)
        batches.append(order[start:start + rows])
        start += rows
    return batches


def eos_ids(model: Model, tokenizer: Any = None) -> tuple[int, ...]:
    """End-of-sequence ids: the union of config.json's, generation_config.json's and the tokenizer's eos.

    Chat models often end a turn with a token (`<|im_end|>`, `<|eot_id|>`) that only one of these names,
    so stopping at any of them is what a chat evaluation needs.
    """
    found: set[int] = set()

    def add(value: Any) -> None:
        if isinstance(value, int):
            found.add(value)
        elif isinstance(value, (list, tuple)):
            found.update(v for v in value if isinstance(v, int))

    add(model.config.hf.get("eos_token_id"))
    if model.source is not None and (Path(model.source) / "generation_config.json").is_file():
        path = Path(model.source) / "generation_config.json"
        check_inside(model.source, path)
        add(read_json(path).get("eos_token_id"))  # errors name the file: not UTF-8, not JSON, not an object
    if tokenizer is not None:
        add(getattr(tokenizer, "eos_token_id", None))
    return tuple(sorted(found))


def context_length(config: ModelConfig) -> int | None:
    """The model's context, config.json's max_position_embeddings (None when the config does not give one)."""
    n = config.hf.get("max_position_embeddings")
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


def check_max_new_tokens(config: ModelConfig, max_new_tokens: int, option: str = "max_new_tokens",
                         source: str = "the model's config.json") -> None:
    """Refuse to generate more new tokens than the model's context holds (checked before any generation)."""
    context = context_length(config)
    if context is not None and max_new_tokens > context:
        raise EnchtableError(f"{option} {max_new_tokens} exceeds the model's context: max_position_embeddings is "
                             f"{context} in {source}; ask for at most {context} new tokens")


def _choose(logits: jax.Array, keys: jax.Array, step: jax.Array, sample: bool, temperature: jax.Array,
            top_p: jax.Array) -> jax.Array:
    """Next token per row [B] from last-position logits [B, V]: argmax, or a top-p sample at `temperature`."""
    logits = logits.astype(jnp.float32)
    if not sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens; the first token always stays
    kept = jnp.where((before < top_p) | (top_p >= 1), sorted_logits, -jnp.inf)  # top_p 1: no rounding losses
    step_keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(keys)
    picked = jax.vmap(jax.random.categorical)(step_keys, kept)
    return jnp.take_along_axis(order, picked[:, None], axis=-1)[:, 0].astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "sample", "expert_config", "first_m"))
def _decode(params: Params, config: ModelConfig, input_ids: jax.Array, attention_mask: jax.Array, keys: jax.Array,
            done: jax.Array, stop_ids: jax.Array, pad_id: jax.Array, temperature: jax.Array, top_p: jax.Array,
            max_new_tokens: int, sample: bool, expert: Params | None = None, expert_config: ModelConfig | None = None,
            first_m: int = 0, alpha: jax.Array | None = None, common_tokens: jax.Array | None = None) -> jax.Array:
    """New tokens [B, max_new_tokens] for left-padded prompts [B, P]; after a row's eos id, `pad_id`.

    `done` [B] marks rows that generate nothing (batch padding); the loop ends when every row is done. With an
    `expert` model, the first `first_m` tokens are chosen from SafeDecoding's distribution
    (`defenses.safedecoding_scores`), the expert reading the same tokens through a cache of its own.
    """
    b, width = input_ids.shape
    cache = init_cache(config, b, width + max_new_tokens, params["model.embed_tokens.weight"].dtype)
    logits, cache = forward_cached(params, config, input_ids, attention_mask, cache)
    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32)

    def step_with(scores, step, cache, out, done):
        token = jnp.where(done, pad_id, _choose(scores, keys, step, sample, temperature, top_p))
        out = out.at[:, step].set(token)
        done = done | jnp.isin(token, stop_ids)
        logits, cache = forward_cached(params, config, token[:, None], jnp.ones((b, 1), jnp.int32), cache)
        return token, logits, cache, out, done

    def cond(state):
        step, _, _, _, done = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, logits, cache, out, done = state
        _, logits, cache, out, done = step_with(logits, step, cache, out, done)
        return step + 1, logits, cache, out, done

    state = (jnp.int32(0), logits, cache, out, done)
    if expert is not None:
        guided = min(first_m, max_new_tokens)
        expert_cache = init_cache(expert_config, b, width + guided, expert["model.embed_tokens.weight"].dtype)
        expert_logits, expert_cache = forward_cached(expert, expert_config, input_ids, attention_mask, expert_cache)

        def guided_cond(state):
            (step, _, _, _, done), _, _ = state
            return (step < guided) & ~jnp.all(done)

        def guided_body(state):
            (step, logits, cache, out, done), expert_logits, expert_cache = state
            scores = safedecoding_scores(logits, expert_logits, alpha, common_tokens)
            token, logits, cache, out, done = step_with(scores, step, cache, out, done)
            expert_logits, expert_cache = forward_cached(expert, expert_config, token[:, None],
                                                         jnp.ones((b, 1), jnp.int32), expert_cache)
            return (step + 1, logits, cache, out, done), expert_logits, expert_cache

        state = jax.lax.while_loop(guided_cond, guided_body, (state, expert_logits, expert_cache))[0]
    return jax.lax.while_loop(cond, body, state)[3]


def generate_ids(model: Model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 128,
                 stop_ids: Sequence[int] = (), pad_id: int = 0, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0, batch_size: int = 16, progress: bool | None = None, expert: Model | None = None,
                 safedecoding: SafeDecodingOptions | None = None) -> list[list[int]]:
    """New token ids for each prompt of token ids, up to and including the first id in `stop_ids`.

    temperature 0 is greedy decoding; above 0, sampling from the top-p nucleus with a key per prompt. With an
    `expert` (a safety expert sharing the model's vocabulary), SafeDecoding with `safedecoding`'s parameters
    (default: the paper's): temperature and top-p then act on its distribution for the first m tokens.
    """
    if safedecoding is not None and expert is None:
        raise EnchtableError("SafeDecoding options were given without an expert model; pass expert=")
    safedecoding = safedecoding if safedecoding is not None else SafeDecodingOptions()
    if expert is not None:
        check_expert_width(model, expert, safedecoding)
    if max_new_tokens < 1:
        raise EnchtableError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise EnchtableError(f"batch_size must be >= 1, got {batch_size}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise EnchtableError(f"need temperature >= 0 and 0 < top_p <= 1, got temperature={temperature}, top_p={top_p}")
    check_max_new_tokens(model.config, max_new_tokens)
    empty = [i for i, p in enumerate(prompts) if not len(p)]
    if empty:
        raise EnchtableError(f"prompt(s) {empty[:5]} have no tokens; every prompt needs at least one")
    batches = batch_members([len(p) for p in prompts], batch_size, model.config.num_attention_heads, max_new_tokens)
    base_key = jax.random.key(seed)
    stop_set = set(stop_ids)
    stop_list = sorted(stop_set)
    slots = max(4, -(-len(stop_list) // 4) * 4)  # padded with -1 to a multiple of 4: one compilation for most sets
    stops = jnp.asarray(stop_list + [-1] * (slots - len(stop_list)), jnp.int32)
    results: list[list[int]] = [[] for _ in prompts]
    guide = {} if expert is None else {
        "expert": expert.params, "expert_config": expert.config, "first_m": safedecoding.first_m,
        "alpha": jnp.float32(safedecoding.alpha), "common_tokens": jnp.int32(safedecoding.common_tokens)}
    for members in tqdm(batches, desc="generate", unit="batch", disable=None if progress is None else not progress):
        rows, width = batch_bucket(len(members), batch_size), width_bucket(max(len(prompts[i]) for i in members))
        ids = np.full((rows, width), pad_id, np.int32)
        mask = np.zeros((rows, width), np.int32)
        for row, i in enumerate(members):
            ids[row, width - len(prompts[i]):] = prompts[i]
            mask[row, width - len(prompts[i]):] = 1
        ids[len(members):], mask[len(members):] = ids[0], mask[0]  # batch padding: a copy of row 0, marked done
        indices = np.asarray(members + [0] * (rows - len(members)), np.uint32)
        keys = jax.vmap(lambda i: jax.random.fold_in(base_key, i))(indices)
        done = np.arange(rows) >= len(members)
        tokens = np.asarray(_decode(model.params, model.config, ids, mask, keys, done, stops, jnp.int32(pad_id),
                                    jnp.float32(temperature if temperature > 0 else 1.0), jnp.float32(top_p),
                                    max_new_tokens=max_new_tokens, sample=temperature > 0, **guide))
        for row, i in enumerate(members):
            new = tokens[row].tolist()
            ends = [k for k, t in enumerate(new) if t in stop_set]
            results[i] = new[:ends[0] + 1] if ends else new
    return results


def resolve_tokenizer(model: Model, tokenizer: Any = None) -> Any:
    """`tokenizer` itself, or the tokenizer saved in the folder it names (None: the model's own folder)."""
    if tokenizer is None or isinstance(tokenizer, (str, Path)):
        return load_tokenizer(tokenizer if tokenizer is not None else model.source,
                              "generation renders prompts with the model's tokenizer and chat template")
    return tokenizer


def complete(model: Model, tokenizer: Any, prompt_ids: Sequence[Sequence[int]], **options: Any) -> list[str]:
    """Text answers to prompts given as token ids: `generate_ids` stopping at `eos_ids`, then decoded.

    The final stop id is dropped and special tokens are skipped; `options` are `generate_ids`' keywords.
    """
    stops = eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops[0] if stops else 0)
    new = generate_ids(model, prompt_ids, stop_ids=stops, pad_id=pad, **options)
    return [tokenizer.decode(ids[:-1] if ids and ids[-1] in stops else ids, skip_special_tokens=True) for ids in new]


def generate(model: Model, tokenizer: Any, prompts: Sequence[str | list[Message]], *, max_new_tokens: int = 128,
             template: str | None = None, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             batch_size: int = 16, progress: bool | None = None, reminder: SelfReminder | None = None,
             expert: Model | None = None, safedecoding: SafeDecodingOptions | None = None) -> list[str]:
    """Responses of `model` (an `enchtable_jax.Model`) to each prompt, as one user turn in the chat template (or a
    list of role/content messages).

    tokenizer: a transformers tokenizer, a folder holding one, or None for the model's own folder.
    template: None for the tokenizer's chat template, a name in `models.tokenizer.TEMPLATES`, or a .jinja
    file. Stops at any eos id (see `eos_ids`) or after `max_new_tokens`; special tokens are not decoded.
    Defenses (eval/defenses.py): `reminder` wraps every prompt in Self-Reminder's wording (`defenses.SELF_REMINDER`);
    `expert`, a safety expert with the model's tokenizer, decodes with SafeDecoding (`safedecoding`: its parameters).
    """
    tokenizer = resolve_tokenizer(model, tokenizer)
    if expert is not None:
        check_expert(model, tokenizer, expert, safedecoding)
    conversations = remind(prompts, tokenizer, template, reminder) if reminder is not None else prompts
    return complete(model, tokenizer, render_prompts(conversations, tokenizer, template), max_new_tokens=max_new_tokens,
                    temperature=temperature, top_p=top_p, seed=seed, batch_size=batch_size, progress=progress,
                    expert=expert, safedecoding=safedecoding)
