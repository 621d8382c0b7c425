"""Chat rendering: conversations -> token ids through a chat template, with the assistant turns marked.

Each conversation (role/content messages) is rendered by the model's chat template (or a built-in one,
`models.tokenizer.TEMPLATES`, or a .jinja file) into token ids; the loss mask is 1 exactly on the assistant
turns' tokens, end-of-turn marker included. Evaluation prompts go through the same template resolution and
control-token sanitizing, so they look exactly like the turns a model was trained on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from enchtable_jax.models.tokenizer import TEMPLATES
from enchtable_jax.errors import EnchtableError

TEMPLATE_HINT = f"pass --template {'|'.join(TEMPLATES)}|FILE.jinja"

Message = dict[str, str]


class DataError(EnchtableError):
    """Unusable training data or chat template; the message names the file, record and field, and the fix."""


@dataclasses.dataclass(frozen=True, eq=False)
class Example:
    """One rendered conversation: token ids and the 0/1 mask of target (assistant) tokens, of equal length."""

    input_ids: np.ndarray  # int32 [T]
    loss_mask: np.ndarray  # int8 [T]

    def __post_init__(self):
        if self.input_ids.shape != self.loss_mask.shape or self.input_ids.ndim != 1:
            raise ValueError(f"input_ids {self.input_ids.shape} and loss_mask {self.loss_mask.shape} must be equal 1-D")
        if self.input_ids.dtype != np.int32 or self.loss_mask.dtype != np.int8:
            raise ValueError(f"expected int32 input_ids and int8 loss_mask, got {self.input_ids.dtype}, "
                             f"{self.loss_mask.dtype}")

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclasses.dataclass(frozen=True)
class RenderStats:
    """What rendering did: counts for the run log and manifest (tokens are counted after truncation)."""

    n_records: int
    n_examples: int  # kept
    n_truncated: int  # longer than max_length, cut to it (kept or dropped)
    n_dropped: int  # no target token left after truncation
    n_tokens: int
    n_target_tokens: int
    max_length_seen: int  # longest rendering before truncation


def _template(tokenizer: Any, template: str | None) -> tuple[str, str]:
    """(jinja source, label for messages) of the chat template to use."""
    if template is not None:
        if template in TEMPLATES:
            return TEMPLATES[template], f"built-in template {template!r}"
        path = Path(template)
        if not path.is_file():
            raise DataError(f"template {template!r} is neither a built-in ({', '.join(TEMPLATES)}) nor an existing "
                            "file; pass a name or a path to a .jinja file")
        source = path.read_text(encoding="utf-8")
        if not source.strip():
            raise DataError(f"template file {path} is empty")
        return source, f"template file {path}"
    source = getattr(tokenizer, "chat_template", None)
    if isinstance(source, dict):  # several named templates
        source = source.get("default")
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    if not source:
        raise DataError(f"the tokenizer of {name} has no chat template; {TEMPLATE_HINT}")
    return source, f"the chat template of {name}"


def resolve_template(tokenizer: Any, template: str | None = None) -> str:
    """The jinja chat template: `template` (a TEMPLATES name or a .jinja file) if given, else the tokenizer's."""
    return _template(tokenizer, template)[0]


def _token_ids(tokenizer: Any, messages: list[Message], template: str, generation_prompt: bool, label: str,
               where: str) -> list[int]:
    # Control tokens inside the data (say a literal "<|im_end|>") are encoded as text: only the template's own
    # markers become control tokens, so data cannot forge turn boundaries.
    try:
        ids = tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=generation_prompt,
                                            tokenize=True, return_dict=False, sanitize_control_tokens=True)
    except Exception as e:  # jinja errors, raise_exception() in templates, odd message shapes
        raise DataError(f"{where}: {label} failed to render {len(messages)} message(s): {type(e).__name__}: {e}") from e
    return [int(i) for i in ids]


def render_prompts(prompts: Sequence[str | list[Message]], tokenizer: Any,
                   template: str | None = None) -> list[list[int]]:
    """Token ids of each prompt, a string (one user turn) or a list of role/content messages, followed by the
    generation prompt (an opened assistant turn).

    The same template resolution and control-token sanitizing as training data, so evaluation prompts
    look exactly like the turns a model was distilled or fine-tuned on.
    """
    source, label = _template(tokenizer, template)
    return [_token_ids(tokenizer, [{"role": "user", "content": p}] if isinstance(p, str) else p, source, True,
                       label, f"prompt {i}") for i, p in enumerate(prompts)]


def system_turn_supported(tokenizer: Any, template: str | None = None) -> bool:
    """Whether the chat template renders a system message: it neither fails on one (Gemma's raises) nor drops its
    text (some templates keep only user and assistant turns)."""
    source, _ = _template(tokenizer, template)
    probe = "enchtable-system-probe"
    try:
        text = tokenizer.apply_chat_template([{"role": "system", "content": probe}, {"role": "user", "content": "x"}],
                                             chat_template=source, add_generation_prompt=True, tokenize=False)
    except Exception:  # jinja's raise_exception(), an unknown role
        return False
    return probe in text


def _turn_end(tokenizer: Any, through: list[int], start: int, markers: set[int]) -> int:
    """End of an assistant turn's targets in `through` (the rendering up to and including the turn).

    Whitespace that the template writes after an end-of-turn control token (ChatML's newline after
    `<|im_end|>`) separates turns and is not a target; without such a marker everything is kept.
    """
    end = len(through)
    while end > start and not tokenizer.decode([through[end - 1]]).strip():
        end -= 1
    return end if end < len(through) and end > start and through[end - 1] in markers else len(through)


def _prefix_failure(tokenizer: Any, messages: list[Message], shorter: list[Message], prompt: bool, template: str,
                    label: str, where: str, i: int) -> str:
    """Why the tokens of `shorter` are not a prefix of the whole conversation's: the text or the tokenization."""
    what = f"messages[:{len(shorter)}]" + (" with add_generation_prompt=True" if prompt else "")
    text = tokenizer.apply_chat_template(shorter, chat_template=template, add_generation_prompt=prompt, tokenize=False)
    if tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False).startswith(text):
        return (f"{where}: the tokenizer merges text across a boundary of assistant message {i} (the "
                f"rendering of {what} by {label} ends inside a token of the whole conversation), so the message's "
                f"tokens cannot be told apart; leading whitespace in a response does this with BPE tokenizers: "
                f"strip it, or {TEMPLATE_HINT}")
    return (f"{where}: {label} does not render {what} as a prefix of the whole conversation (it rewrites earlier "
            f"turns), so assistant message {i} cannot be located; {TEMPLATE_HINT}")


def _targets(tokenizer: Any, messages: list[Message], full: list[int], template: str, label: str, where: str,
             markers: set[int]) -> np.ndarray:
    """0/1 mask over `full` marking every assistant turn's tokens, located by rendering prefixes."""
    mask = np.zeros(len(full), np.int8)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i == 0:
            raise DataError(f"{where}: messages[0] is an assistant message; a response must follow a system or "
                            "user message")
        before = _token_ids(tokenizer, messages[:i], template, True, label, where)
        through = full if i == len(messages) - 1 else _token_ids(tokenizer, messages[:i + 1], template, False,
                                                                   label, where)
        start = len(before)
        end = _turn_end(tokenizer, through, start, markers)
        for prefix, shorter, prompt in ((before, messages[:i], True), (through[:end], messages[:i + 1], False)):
            if full[:len(prefix)] != prefix:
                raise DataError(_prefix_failure(tokenizer, messages, shorter, prompt, template, label, where, i))
        if end <= start:
            raise DataError(f"{where}: {label} renders assistant message {i} as no tokens; {TEMPLATE_HINT}")
        mask[start:end] = 1
    return mask


def render(conversations: Sequence[list[Message]], tokenizer: Any, max_length: int,
           template: str | None = None) -> tuple[list[Example], RenderStats]:
    """Chat-templated examples whose loss mask covers exactly the assistant turns (end-of-turn marker included).

    Examples longer than `max_length` keep their first `max_length` tokens; those left without a target are
    dropped. Position 0 is never a target (nothing predicts it).
    """
    if max_length < 2:
        raise DataError(f"max_length must be at least 2, got {max_length}")
    source, label = _template(tokenizer, template)
    markers = set(tokenizer.get_added_vocab().values())  # control tokens that may end a turn
    examples, n_truncated, n_dropped, longest = [], 0, 0, 0
    for k, messages in enumerate(conversations):
        where = f"conversation {k}"
        full = _token_ids(tokenizer, messages, source, False, label, where)
        mask = _targets(tokenizer, messages, full, source, label, where, markers)
        mask[:1] = 0
        longest = max(longest, len(full))
        if len(full) > max_length:
            n_truncated += 1
            full, mask = full[:max_length], mask[:max_length]
        if not mask.any():
            n_dropped += 1
            continue
        examples.append(Example(np.asarray(full, np.int32), mask))
    stats = RenderStats(n_records=len(conversations), n_examples=len(examples), n_truncated=n_truncated,
                        n_dropped=n_dropped, n_tokens=sum(len(e) for e in examples),
                        n_target_tokens=int(sum(int(e.loss_mask.sum()) for e in examples)), max_length_seen=longest)
    return examples, stats
