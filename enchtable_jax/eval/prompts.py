"""Evaluation inputs read from JSON / JSONL files: safety prompt sets, question/answer sets, HumanEval problems.

Prompt sets come in the shapes public sets ship in: a list of strings (AdvBench, HarmBench), a list of
objects with a `prompt`, `question`, `goal`, `instruction` or `behavior` field, nested
{category: {subcategory: [...]}} or {category: [...]} (CatQA, HarmfulQA), or JSONL lines of any of
the item forms. Order is kept (nested sets in file order), so `--limit N` takes the first N.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from enchtable_jax.errors import EnchtableError
from enchtable_jax.options import EVAL_OPTIONS, check_values
from enchtable_jax.safe_io import read_json_or_jsonl

PROMPT_FIELDS = ("prompt", "question", "goal", "instruction", "behavior")


class PromptFileError(EnchtableError):
    """An unusable evaluation file; the message names the file, the item and the fix."""


def _prompt(item: Any, where: str) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict):
        for field in PROMPT_FIELDS:
            if isinstance(item.get(field), str):
                return item[field]
        raise PromptFileError(f"{where}: object with fields {sorted(item)} has no string field among "
                              f"{', '.join(PROMPT_FIELDS)}; rename the prompt's field to one of them")
    raise PromptFileError(f"{where}: a {type(item).__name__}; expected a string or an object with a "
                          f"{'/'.join(PROMPT_FIELDS)} field")


def _flatten(value: Any, where: str) -> list[str]:
    if isinstance(value, list):
        return [_prompt(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, dict) and not any(f in value for f in PROMPT_FIELDS):
        return [p for key, sub in value.items() for p in _flatten(sub, f"{where}[{key!r}]")]
    return [_prompt(value, where)]


def load_prompts(path: str | Path, limit: int | None = None) -> list[str]:
    """The prompts of a prompt-set file (any shape in the module docstring), the first `limit` if given."""
    path = Path(path)
    check_values(EVAL_OPTIONS, limit=limit)
    content, _ = read_json_or_jsonl(path, PromptFileError)
    if isinstance(content, str) or not isinstance(content, (list, dict)):
        raise PromptFileError(f"{path}: top level is a {type(content).__name__}; expected a list of prompts or "
                              "a {category: [...]} object")
    prompts = _flatten(content, str(path))
    empty = [i for i, p in enumerate(prompts) if not p.strip()]
    if empty:
        raise PromptFileError(f"{path}: prompt(s) {empty[:5]} are empty; remove them")
    if not prompts:
        raise PromptFileError(f"{path}: no prompts")
    return prompts[:limit] if limit is not None else prompts


def load_records(path: str | Path, fields: tuple[str, ...], limit: int | None = None) -> list[dict[str, Any]]:
    """Objects of a JSON list or JSONL file, each checked to have `fields` (e.g. question/answer, HumanEval's)."""
    path = Path(path)
    check_values(EVAL_OPTIONS, limit=limit)
    content, lines = read_json_or_jsonl(path, PromptFileError)
    if isinstance(content, dict):  # a one-line JSONL file parses as one JSON object
        content, lines = [content], [1]
    if not isinstance(content, list) or not content:
        raise PromptFileError(f"{path}: expected JSONL lines (or a JSON list) of objects with fields "
                              f"{', '.join(fields)}")
    for i, record in enumerate(content):
        where = f"{path}:{lines[i]}" if lines is not None else f"{path}: record {i}"
        if not isinstance(record, dict):
            raise PromptFileError(f"{where}: a {type(record).__name__}; expected an object with fields "
                                  f"{', '.join(fields)}")
        missing = [f for f in fields if f not in record]
        if missing:
            raise PromptFileError(f"{where}: missing field(s) {', '.join(missing)} (has {', '.join(sorted(record))})")
    return content[:limit] if limit is not None else content
