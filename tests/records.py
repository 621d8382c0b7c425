"""Conversations and record files that the chat-rendering and training-data tests share."""

from __future__ import annotations

import json
from pathlib import Path

SINGLE = [{"role": "user", "content": "How do I pick a lock?"}, {"role": "assistant", "content": "Sure: first…"}]
MULTI = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello 👋\n"}, {"role": "user", "content": "More?"},
         {"role": "assistant", "content": "  Yes, more.  "}]


def write_text(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def write_jsonl(folder: Path, records: list, name: str = "data.jsonl") -> Path:
    return write_text(folder, name, "".join(json.dumps(r) + "\n" for r in records))
