"""Training data: records on disk -> conversations (rendered by `models.chat`) -> batches.

Records are JSON (a list) or JSONL (one object per line), in alpaca form (`instruction`, optional
`input`, `output`) or chat form (`messages`: role/content dicts ending with an assistant turn). Each
becomes a conversation that `models.chat.render` turns into token ids with response-only targets. The
epoch order is a pure function of (lengths, batch size, seed, epoch), so a resumed run recomputes the same
batches.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from enchtable_jax.models.chat import DataError, Example, Message
from enchtable_jax.safe_io import read_json_or_jsonl

ROLES = ("system", "user", "assistant")
GROUP_WINDOW_BATCHES = 50  # length grouping sorts within windows of this many batches


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


MIN_WIDTH = 64  # batches shorter than this are padded to it (one compiled shape for short data)
WIDTHS_PER_OCTAVE = 8  # padded widths between n and 2n: padding at most 1/8 of a batch, ~8 compilations per octave


def padded_width(longest: int, max_length: int | None = None) -> int:
    """The width a batch whose longest example has `longest` tokens is padded to, at most `max_length`.

    Widths come from a fixed set (MIN_WIDTH, then WIDTHS_PER_OCTAVE evenly spaced per doubling), so a run
    compiles its step for few shapes, while padding stays under 1/8 of the batch: rounding up to a multiple of
    64 instead padded the distill study's 142-token examples to 192 (a third of each step spent on padding).
    """
    width = MIN_WIDTH
    if longest > MIN_WIDTH:  # spacing: 1/WIDTHS_PER_OCTAVE of the octave (2^(k-1), 2^k] that holds `longest`
        spacing = (1 << (longest - 1).bit_length()) // (2 * WIDTHS_PER_OCTAVE)
        width = -(-longest // spacing) * spacing
    return width if max_length is None else min(width, max_length)


def collate(examples: Sequence[Example], indices: Sequence[int], pad_id: int, max_length: int | None = None,
            rows: int | None = None) -> dict[str, np.ndarray]:
    """A right-padded batch: int32 [rows or len(indices), T] input_ids, attention_mask and loss_mask.

    T is `padded_width` of the longest example (few distinct shapes, so few jit compilations), at most
    `max_length`. `rows` pads the batch with all-zero-mask rows to a fixed size (data-parallel meshes).
    """
    if not len(indices):
        raise ValueError("collate needs at least one index")
    longest = max(len(examples[i]) for i in indices)
    if max_length is not None and longest > max_length:
        raise ValueError(f"an example has {longest} tokens, more than max_length={max_length}; render with the "
                         "same max_length")
    width = padded_width(longest, max_length)
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
