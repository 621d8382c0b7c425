"""Greedy coordinate gradient (GCG): a white-box search for an adversarial suffix, one per prompt.

Zou et al. 2023, "Universal and Transferable Adversarial Attacks on Aligned Language Models", arXiv:2307.15043.

The user turn is `prompt + " " + suffix` in the chat template, followed by the generation prompt; the loss is the
mean cross-entropy of a target answer opening ("Sure, here is") after it. Each step (the paper's Algorithm 1):
1. the gradient of the loss with respect to the suffix tokens as one-hot rows [n, vocab], one `jax.grad` through
   the embedding matmul (`forward(inputs_embeds=onehot @ E)`);
2. per position, the top-k tokens by negative gradient among the allowed ones;
3. B candidates, each the current suffix with one uniformly drawn position set to a uniformly drawn top-k token;
4. every candidate's loss in one jitted batched forward, the candidate axis sharded over the devices;
5. the best candidate becomes the suffix (as in the paper, even when worse); the best ever is what is returned.

Token filter: candidates may use only allowed tokens (printable ASCII, not special, each decoding to a text that
encodes back to itself), and a candidate is kept only when its suffix text, rendered in the template, tokenizes
back to exactly the candidate's ids; the suffix chosen at each step is checked once more through
`models.chat.render_prompts`, the rendering `evaluate` uses. So `attack.json`'s suffix text replays to the ids the
search optimised. Sequences are left-padded to a multiple of `WIDTH_STEP` tokens: one compilation per width.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from enchtable_jax.converters.model_io import load
from enchtable_jax.converters.outputs import check_output, template_input
from enchtable_jax.errors import EnchtableError
from enchtable_jax.eval.generate import generate, resolve_tokenizer
from enchtable_jax.eval.judge import Judge, RefusalJudge
from enchtable_jax.eval.suffixes import ATTACK_FILE, attack_result, with_suffix, write_attack
from enchtable_jax.kernels.cpu_threads import training_devices
from enchtable_jax.models.chat import render_prompts, resolve_template
from enchtable_jax.models.config import ModelConfig
from enchtable_jax.models.model import Model
from enchtable_jax.models.transformer import Params, forward
from enchtable_jax.options import GCGOptions

METHOD = "gcg"
CANDIDATES = "candidates"  # the mesh axis the candidate batch is split over
_DECODE = {"skip_special_tokens": False, "clean_up_tokenization_spaces": False}
# Widths are multiples of this, not generation's buckets (up to a third padding): every step pays for each padded
# token B times, a width's compilation is paid once (a 67-token sequence: 72 wide, not 96; candidate losses 1.5x faster
# on SmolLM2-135M at B = 64 on 2 CPU cores).
WIDTH_STEP = 8


@dataclasses.dataclass(frozen=True)
class Layout:
    """One prompt's rendering cut around its suffix: prefix + suffix + after is the chat-templated user turn and
    generation prompt; target follows it. `lead` is the text the first suffix token carries before the suffix
    proper (" " when the tokenizer merges the separator into it, else ""); `before`/`after_text` the rendered text
    around the user content (for the fast round-trip check)."""

    prompt: str
    prefix: tuple[int, ...]
    suffix: tuple[int, ...]
    after: tuple[int, ...]
    target: tuple[int, ...]
    lead: str
    before_text: str
    after_text: str

    @property
    def prompt_ids(self) -> list[int]:
        """The rendered prompt with the initial suffix (what `render_prompts` gives)."""
        return [*self.prefix, *self.suffix, *self.after]


def allowed_tokens(tokenizer: Any, vocab_size: int) -> np.ndarray:
    """Boolean [vocab_size]: tokens a suffix may use: known to the tokenizer, not special or added, decoding to
    printable ASCII (space to tilde) that encodes back to the token alone."""
    n = min(len(tokenizer), vocab_size)
    special = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    texts = tokenizer.batch_decode([[i] for i in range(n)], **_DECODE)
    printable = [i for i, t in enumerate(texts) if i not in special and t and all(" " <= c <= "~" for c in t)]
    allowed = np.zeros(vocab_size, bool)
    if printable:
        encoded = tokenizer([texts[i] for i in printable], add_special_tokens=False)["input_ids"]
        for i, ids in zip(printable, encoded):
            allowed[i] = list(ids) == [i]
    return allowed


def _decoded_suffix(tokenizer: Any, layout: Layout, suffixes: Sequence[Sequence[int]]) -> list[str | None]:
    """The suffix text of each id sequence, decoded after the prefix's last token (so tokenizers that drop a
    leading space of a first token decode it as in context), `lead` removed; None where that is impossible."""
    context = list(layout.prefix[-1:])
    head = tokenizer.decode(context, **_DECODE)
    texts = tokenizer.batch_decode([context + [int(t) for t in s] for s in suffixes], **_DECODE)
    lead = head + layout.lead
    return [t[len(lead):] if t.startswith(lead) else None for t in texts]


def _encodes_to(tokenizer: Any, layout: Layout, texts: Sequence[str | None],
                suffixes: np.ndarray) -> np.ndarray:
    """Boolean [B]: whether the rendered text with each suffix text tokenizes to prefix + suffix ids + after."""
    ok = np.zeros(len(texts), bool)
    rows = [i for i, t in enumerate(texts) if t is not None]
    if not rows:
        return ok
    full = [layout.before_text + with_suffix(layout.prompt, texts[i]) + layout.after_text for i in rows]
    encoded = tokenizer(full, add_special_tokens=False)["input_ids"]
    p, n = len(layout.prefix), suffixes.shape[1]
    for i, ids in zip(rows, encoded):
        ok[i] = (len(ids) == p + n + len(layout.after) and tuple(ids[:p]) == layout.prefix
                 and tuple(ids[p + n:]) == layout.after and list(ids[p:p + n]) == suffixes[i].tolist())
    return ok


def _replays(tokenizer: Any, layout: Layout, text: str, ids: Sequence[int], template: str | None) -> bool:
    """Whether `render_prompts` (evaluate's rendering) of prompt + suffix text gives prefix + ids + after."""
    rendered = render_prompts([with_suffix(layout.prompt, text)], tokenizer, template)[0]
    return rendered == [*layout.prefix, *map(int, ids), *layout.after]


def prompt_layout(tokenizer: Any, prompt: str, target: str, suffix_length: int, template: str | None = None,
                  where: str = "prompt") -> Layout:
    """The token layout of `prompt` with the initial suffix of `suffix_length` tokens: the paper's '! ! ! ...'
    when the tokenizer gives one token per mark, else '!!!...' (byte-level vocabularies)."""
    source = resolve_template(tokenizer, template)
    target_ids = tuple(tokenizer(target, add_special_tokens=False)["input_ids"])
    if not target_ids:
        raise EnchtableError(f"option target {target!r} has no tokens")
    for init in (" ".join(["!"] * suffix_length), "!" * suffix_length):
        content = with_suffix(prompt, init)
        ids = render_prompts([content], tokenizer, template)[0]
        text = tokenizer.apply_chat_template([{"role": "user", "content": content}], chat_template=source,
                                             add_generation_prompt=True, tokenize=False)
        at = text.rfind(content)
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        if at < 0 or list(encoded["input_ids"]) != ids:
            raise EnchtableError(f"{where}: the chat template does not write the user turn verbatim, or its text "
                                 "does not tokenize as the rendering does; the suffix cannot be located")
        start, end = at + len(prompt) + 1, at + len(content)
        span = [k for k, (a, b) in enumerate(encoded["offset_mapping"]) if b > start and a < end]
        if len(span) != suffix_length or span != list(range(span[0], span[-1] + 1)):
            continue
        first, last = span[0], span[-1] + 1
        layout = Layout(prompt, tuple(ids[:first]), tuple(ids[first:last]), tuple(ids[last:]), target_ids, "",
                        text[:at], text[at + len(content):])
        for lead in ("", " "):
            layout = dataclasses.replace(layout, lead=lead)
            if _decoded_suffix(tokenizer, layout, [layout.suffix]) == [init]:
                return layout
    raise EnchtableError(f"{where}: the tokenizer does not split an initial suffix of '!' marks into "
                         f"{suffix_length} tokens of their own")


def _target_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean cross-entropy [B] of `targets` [T] under logits [B, T + 1, V] (the last position predicts nothing)."""
    logits = logits[:, :-1].astype(jnp.promote_types(logits.dtype, jnp.float32))
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, targets[None, :, None], axis=-1)[..., 0].mean(axis=-1)


def onehot_loss(params: Params, config: ModelConfig, ids: jax.Array, mask: jax.Array, start: jax.Array,
                onehot: jax.Array, targets: jax.Array) -> jax.Array:
    """The target loss of one sequence `ids` [L] (last T tokens: the target) whose suffix rows, from `start`, are
    the relaxed tokens `onehot` [n, vocab] (rows of the identity give the plain loss)."""
    embed = params["model.embed_tokens.weight"]
    x = embed[ids][None]
    rows = (onehot @ embed.astype(onehot.dtype)).astype(embed.dtype)
    x = jax.lax.dynamic_update_slice(x, rows[None], (0, start, 0))
    logits = forward(params, config, None, mask[None], inputs_embeds=x, tail=targets.shape[0] + 1)
    return _target_nll(logits, targets)[0]


@functools.partial(jax.jit, static_argnames="config")
def _loss_and_grad(params, config, ids, mask, start, onehot, targets):
    return jax.value_and_grad(onehot_loss, argnums=5)(params, config, ids, mask, start, onehot, targets)


@functools.partial(jax.jit, static_argnames="config")
def candidate_losses(params: Params, config: ModelConfig, ids: jax.Array, mask: jax.Array, start: jax.Array,
                     candidates: jax.Array, targets: jax.Array) -> jax.Array:
    """Target loss [B] of `ids` [L] with its suffix (from `start`) replaced by each row of `candidates` [B, n].

    The rows follow `candidates`' sharding: split over a mesh's candidate axis, each device evaluates its share."""
    b = candidates.shape[0]
    rows = jax.lax.dynamic_update_slice(jnp.broadcast_to(ids, (b, ids.shape[0])), candidates, (0, start))
    logits = forward(params, config, rows, jnp.broadcast_to(mask, rows.shape), tail=targets.shape[0] + 1)
    return _target_nll(logits, targets)


@functools.partial(jax.jit, static_argnames=("batch", "topk"))
def sample_candidates(key: jax.Array, suffix: jax.Array, grad: jax.Array, allowed: jax.Array, batch: int,
                      topk: int) -> jax.Array:
    """[batch, n] candidates: the suffix with one uniform position set to a uniform pick of that position's
    `topk` allowed tokens of most negative gradient."""
    top = jax.lax.top_k(jnp.where(allowed, -grad.astype(jnp.float32), -jnp.inf), topk)[1]
    key_position, key_token = jax.random.split(key)
    position = jax.random.randint(key_position, (batch,), 0, suffix.shape[0])
    token = top[position, jax.random.randint(key_token, (batch,), 0, topk)]
    return jnp.broadcast_to(suffix, (batch, suffix.shape[0])).at[jnp.arange(batch), position].set(token)


def padded_sequence(layout: Layout, suffix: Sequence[int], pad_id: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(ids [W], mask [W], suffix start): prefix + suffix + after + target, left-padded to a multiple of
    `WIDTH_STEP`."""
    body = [*layout.prefix, *map(int, suffix), *layout.after, *layout.target]
    width = -(-len(body) // WIDTH_STEP) * WIDTH_STEP
    ids, mask = np.full(width, pad_id, np.int32), np.zeros(width, np.int32)
    ids[width - len(body):], mask[width - len(body):] = body, 1
    return ids, mask, width - len(body) + len(layout.prefix)


def search(model: Model, tokenizer: Any, layout: Layout, options: GCGOptions, allowed: np.ndarray, mesh: Mesh,
           key: jax.Array, template: str | None, pad_id: int, progress: bool | None) -> dict[str, Any]:
    """One prompt's search (`options.steps` steps from the layout's initial suffix; the model's parameters placed
    on `mesh` as `gcg_attack` places them): the best suffix found (ids and text), its loss, the loss curve, steps
    and stop cause. The bench's GCG study times it."""
    params, config = model.params, model.config
    suffix = np.asarray(layout.suffix, np.int32)
    ids, mask, start = padded_sequence(layout, suffix, pad_id)
    targets, vocab = jnp.asarray(layout.target, jnp.int32), config.vocab_size
    devices = mesh.devices.size
    rows = -(-options.batch // devices) * devices  # padded to a multiple of the device count; extras invalid
    topk = int(min(options.topk, allowed.sum()))
    split = NamedSharding(mesh, PartitionSpec(CANDIDATES))
    dtype = jnp.promote_types(params["model.embed_tokens.weight"].dtype, jnp.float32)
    began = time.perf_counter()
    loss, grad = _loss_and_grad(params, config, ids, mask, start, jax.nn.one_hot(suffix, vocab, dtype=dtype), targets)
    curve = [float(loss)]
    best_loss, best = curve[0], suffix
    stopped, steps = "steps", 0
    for step in tqdm(range(options.steps), desc="gcg", unit="step", disable=None if progress is None else not progress):
        candidates = np.asarray(sample_candidates(jax.random.fold_in(key, step), suffix, grad, allowed, rows, topk))
        texts = _decoded_suffix(tokenizer, layout, candidates)
        valid = _encodes_to(tokenizer, layout, texts, candidates) & (np.arange(rows) < options.batch)
        losses = np.asarray(candidate_losses(params, config, ids, mask, start, jax.device_put(candidates, split),
                                             targets), np.float64)
        losses[~valid] = np.inf
        steps = step + 1
        chosen = next((b for b in np.argsort(losses, kind="stable") if np.isfinite(losses[b])
                       and _replays(tokenizer, layout, texts[b], candidates[b], template)), None)
        if chosen is not None:
            suffix, loss = candidates[chosen], float(losses[chosen])
            if loss < best_loss:
                best_loss, best = loss, suffix
        curve.append(float(loss))
        if options.time_budget is not None and time.perf_counter() - began > options.time_budget:
            stopped = "time"
            break
        if step + 1 < options.steps:
            grad = _loss_and_grad(params, config, ids, mask, start, jax.nn.one_hot(suffix, vocab, dtype=dtype),
                                  targets)[1]
    text = _decoded_suffix(tokenizer, layout, [best])[0]
    return {"suffix": text, "suffix_ids": [int(t) for t in best], "loss_curve": curve, "final_loss": best_loss,
            "steps": steps, "stopped": stopped, "seconds": round(time.perf_counter() - began, 3)}


def gcg_attack(model: Model | str | Path, tokenizer: Any = None, prompts: Sequence[str] = (), *,
               options: GCGOptions | None = None, targets: Sequence[str] | None = None, judge: Judge | None = None,
               template: str | None = None, devices: Sequence[jax.Device] | None = None, batch_size: int = 16,
               out: str | Path | None = None, overwrite: bool = False, progress: bool | None = None,
               **overrides: Any) -> dict[str, Any]:
    """Search an adversarial suffix for each prompt with GCG, answer prompt + suffix, judge the answers.

    model: an `enchtable_jax.Model` or a folder; tokenizer: a transformers tokenizer, a folder, or None for the
    model's. options: `GCGOptions` (the paper's defaults), or its fields as keywords (`steps=50`). targets: one
    target string per prompt instead of `options.target`. judge: decides `broken` (default `RefusalJudge()`,
    shown the prompt without the suffix). devices: the candidate batch is split over them (default: every
    accelerator, or one CPU device, `kernels.cpu_threads.training_devices`). out: a folder for attack.json,
    checked before any work (as `evaluate`'s). Returns the attack.json dict (`eval.suffixes`).
    """
    options = dataclasses.replace(options or GCGOptions(), **overrides)
    prompts = list(prompts)
    if not prompts:
        raise EnchtableError("gcg_attack needs at least one prompt")
    if targets is not None and len(targets) != len(prompts):
        raise EnchtableError(f"targets: {len(targets)} given for {len(prompts)} prompts; give one per prompt")
    if out is not None:
        inputs = {"--model": model, "--tokenizer": tokenizer, "--template": template_input(template)}
        out = check_output(Path(out) / ATTACK_FILE, inputs, overwrite, file=True).parent
    if isinstance(model, (str, Path)):
        model = load(model, progress=progress)
    tokenizer = resolve_tokenizer(model, tokenizer)
    judge = judge if judge is not None else RefusalJudge()
    mesh = Mesh(np.asarray(list(devices or training_devices())), (CANDIDATES,))
    model = Model(model.config, jax.device_put(model.params, NamedSharding(mesh, PartitionSpec())), model.source)
    layouts = [prompt_layout(tokenizer, p, targets[i] if targets is not None else options.target,
                             options.suffix_length, template, f"prompt {i}") for i, p in enumerate(prompts)]
    allowed = allowed_tokens(tokenizer, model.config.vocab_size)
    if not allowed.any():
        raise EnchtableError("the tokenizer has no printable ASCII token that encodes back to itself; GCG has no "
                             "candidate tokens")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    began = time.perf_counter()
    base_key = jax.random.key(options.seed)
    records = [{"prompt": layout.prompt, "target": tokenizer.decode(list(layout.target), **_DECODE),
                **search(model, tokenizer, layout, options, allowed, mesh, jax.random.fold_in(base_key, i),
                         template, pad_id, progress)} for i, layout in enumerate(layouts)]
    responses = generate(model, tokenizer, [with_suffix(r["prompt"], r["suffix"]) for r in records],
                         max_new_tokens=options.max_new_tokens, template=template, batch_size=batch_size,
                         progress=progress)
    verdicts = judge.judge(prompts, responses)
    for record, response, verdict in zip(records, responses, verdicts):
        record.update(response=response, broken=bool(verdict))
    settings = {**dataclasses.asdict(options), "template": template, "devices": mesh.devices.size}
    result = attack_result(str(model.source) if model.source is not None else None, METHOD, judge.name, settings,
                           records, time.perf_counter() - began)
    if out is not None:
        write_attack(out, result, overwrite=overwrite)
    return result
