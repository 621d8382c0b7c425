"""Distillation data: records on disk -> chat-templated token ids with response-only targets -> batches.

Records are JSON (a list) or JSONL (one object per line), in alpaca form (`instruction`, optional
`input`, `output`) or chat form (`messages`: role/content dicts ending with an assistant turn). Each
becomes a conversation that the model's chat template (or a built-in one) renders into token ids; the
loss mask is 1 exactly on the assistant turns' tokens, end-of-turn marker included. The epoch order is
a pure function of (lengths, batch size, seed, epoch), so a resumed run recomputes the same batches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from enchtable_jax.models.tokenizer import TEMPLATES
from enchtable_jax.errors import EnchtableError
from enchtable_jax.safe_io import JSONFileError, parse_json

ROLES = ("system", "user", "assistant")
GROUP_WINDOW_BATCHES = 50  # length grouping sorts within windows of this many batches
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


# ---------------------------------------------------------------------------------------------- reading

def _string(value: Any, where: str, field: str, required: bool = True) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, str):
        what = "missing" if value is None else f"a {type(value).__name__}"
        raise DataError(f"{where}: field '{field}' is {what}; expected a string")
    return value


def _conversation(record: Any, where: str) -> list[Message]:
    """One record (alpaca or chat form) as a list of role/content messages, validated."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with 'instruction'/'output' or 'messages', "
                        f"got a {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects")
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise DataError(f"{where}: field 'messages[{i}]' is a {type(m).__name__}; "
                                "expected an object {role, content}")
            role = _string(m.get("role"), where, f"messages[{i}].role")
            if role not in ROLES:
                raise DataError(f"{where}: field 'messages[{i}].role' is {role!r}; expected one of {', '.join(ROLES)}")
            out.append({"role": role, "content": _string(m.get("content"), where, f"messages[{i}].content")})
        if out[0]["role"] == "assistant":
            raise DataError(f"{where}: field 'messages[0].role' is 'assistant'; a response must follow a system or "
                            "user message")
        if out[-1]["role"] != "assistant":
            raise DataError(f"{where}: field 'messages[{len(out) - 1}].role' is {out[-1]['role']!r}; the last "
                            "message must be the assistant's (it is the training target)")
        return out
    if "instruction" in record or "output" in record:
        instruction = _string(record.get("instruction"), where, "instruction")
        extra = _string(record.get("input"), where, "input", required=False)
        output = _string(record.get("output"), where, "output")
        prompt = instruction + ("\n\n" + extra if extra else "")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    raise DataError(f"{where}: record has fields {sorted(record)}; expected alpaca form ('instruction', optional "
                    "'input', 'output') or chat form ('messages')")


def _one_value(text: str) -> bool:
    """Whether `text` is one JSON value by syntax alone (else it is read as JSONL, line by line)."""
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return False
    return True


def read_json_or_jsonl(path: str | Path, error: type[ValueError] = ValueError) -> tuple[Any, list[int] | None]:
    """(content, line numbers): a JSON file's value and None, or a JSONL file's values and their line numbers.

    A file starting with '[' is one JSON list; otherwise the whole file is tried as one JSON value (an
    object, e.g. nested categories), then as JSONL (blank lines skipped). Errors, raised as `error`,
    name the file and line.
    """
    path = Path(path)
    if path.is_dir():
        raise error(f"{path}: is a folder; give the JSON or JSONL file in it")
    if not path.is_file():
        raise error(f"{path}: file not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text ({e})") from None
    try:
        return parse_json(text.encode("utf-8"), path), None
    except JSONFileError as strict:
        e = strict.__cause__
        if not isinstance(e, json.JSONDecodeError) and _one_value(text):  # a duplicate key, NaN/Infinity
            raise error(f"{path}: invalid JSON ({e})") from None
        if text.lstrip().startswith("["):
            raise error(f"{path}:{e.lineno}: invalid JSON ({e.msg}, column {e.colno})") from None
    values, lines = [], []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:  # strict like every JSON file read: no duplicate keys, no NaN/Infinity
            values.append(parse_json(line.encode("utf-8"), f"{path}:{line_no}"))
        except JSONFileError as e:
            cause = e.__cause__
            detail = f"{cause.msg}, column {cause.colno}" if isinstance(cause, json.JSONDecodeError) else str(cause)
            raise error(f"{path}:{line_no}: invalid JSON ({detail}); JSONL needs one value per line, JSON one "
                        "top-level value") from None
        lines.append(line_no)
    return values, lines


def read_records(path: str | Path) -> list[list[Message]]:
    """Conversations from a JSON list or a JSONL file, each a list of {role, content} ending with the assistant."""
    records, lines = read_json_or_jsonl(path, DataError)
    if lines is None and not isinstance(records, list):  # a one-line JSONL file is one JSON object
        records, lines = [records], [1]
    wheres = [f"{path}: record {i}" for i in range(len(records))] if lines is None else [f"{path}:{n}" for n in lines]
    conversations = [_conversation(r, where) for r, where in zip(records, wheres)]
    if not conversations:
        raise DataError(f"{path}: no records; expected a JSON list or JSONL lines of alpaca or chat records")
    return conversations


def data_hash(path: str | Path) -> str:
    """sha256 (hex) of the file's bytes, for the run manifest."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# -------------------------------------------------------------------------------------------- rendering

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


# ------------------------------------------------------------------------------------------ batching

def epoch_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int,
                  group_by_length: bool = True) -> list[list[int]]:
    """The batches (lists of example indices) of one epoch, a pure function of the arguments.

    Seeded shuffle; with grouping, a sort by length within windows of 50 batches (less padding, still
    random); cut into batches (the last may be smaller); then the batch order is shuffled.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0, got {seed}, {epoch}")
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    if group_by_length:
        sizes = np.asarray(lengths, np.int64)[order]
        window = GROUP_WINDOW_BATCHES * batch_size
        order = np.concatenate([order[i:i + window][np.argsort(sizes[i:i + window], kind="stable")]
                                for i in range(0, len(order), window)] or [order])
    batches = [order[i:i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    return [batches[b] for b in rng.permutation(len(batches))]


def collate(examples: Sequence[Example], indices: Sequence[int], pad_id: int, multiple: int = 64,
            max_length: int | None = None, rows: int | None = None) -> dict[str, np.ndarray]:
    """A right-padded batch: int32 [rows or len(indices), T] input_ids, attention_mask and loss_mask.

    T is the longest example rounded up to `multiple` (few distinct shapes, so few jit compilations),
    at most `max_length`. `rows` pads the batch with all-zero-mask rows to a fixed size (data-parallel meshes).
    """
    if not len(indices):
        raise ValueError("collate needs at least one index")
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    longest = max(len(examples[i]) for i in indices)
    if max_length is not None and longest > max_length:
        raise ValueError(f"an example has {longest} tokens, more than max_length={max_length}; render with the "
                         "same max_length")
    width = -(-longest // multiple) * multiple
    if max_length is not None:
        width = min(width, max_length)
    height = len(indices) if rows is None else rows
    if height < len(indices):
        raise ValueError(f"rows={rows} is fewer than the batch's {len(indices)} examples")
    input_ids = np.full((height, width), pad_id, np.int32)
    attention_mask = np.zeros((height, width), np.int32)
    loss_mask = np.zeros((height, width), np.int32)
    for row, i in enumerate(indices):
        n = len(examples[i])
        input_ids[row, :n] = examples[i].input_ids
        attention_mask[row, :n] = 1
        loss_mask[row, :n] = examples[i].loss_mask
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}
