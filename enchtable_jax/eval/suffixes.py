"""`attack.json`, the record of an adversarial-suffix attack, declared once: written by `enchtable attack`
(attack/gcg.py) and read by `enchtable eval --suffixes` to replay the suffixes on any model (transfer).

A suffix is appended to its prompt as `with_suffix(prompt, suffix)`, `prompt + " " + suffix`, one user turn in
the chat template: the attack optimised the token ids of exactly that rendering, and the replay renders the same
text, so on the attacked model it gets the same ids.

Layout: {format, version, created, model, method, judge, settings, seconds, n, broken, attack_success_rate,
prompts: [record, ...]}; each record has RECORD_FIELDS. `broken` says whether the judge called the attacked
model's answer to prompt + suffix unsafe; the attack success rate is broken records / records.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from enchtable_jax.converters.atomic import write_json
from enchtable_jax.errors import EnchtableError
from enchtable_jax.safe_io import read_json

ATTACK_FILE = "attack.json"
FORMAT = "enchtable-attack"
VERSION = 1
SEPARATOR = " "  # between a prompt and its suffix
# per prompt: the prompt, the suffix text and its token ids (on the attacked model's tokenizer), the target string,
# the loss of the current suffix after each step (index 0: the initial suffix), the loss of the suffix kept, the
# steps run and why the search stopped ("steps" or "time"), seconds, the answer to prompt + suffix and the verdict
RECORD_FIELDS = ("prompt", "suffix", "suffix_ids", "target", "loss_curve", "final_loss", "steps", "stopped",
                 "seconds", "response", "broken")


class AttackFileError(EnchtableError):
    """An unusable attack.json; the message names the file and the field."""


def with_suffix(prompt: str, suffix: str) -> str:
    """The user turn an attack optimises and a replay sends: the prompt, a space, the suffix."""
    return prompt + SEPARATOR + suffix


def attack_result(model: str | None, method: str, judge: str, settings: Mapping[str, Any],
                  records: Sequence[Mapping[str, Any]], seconds: float) -> dict[str, Any]:
    """The attack.json dict of finished records (each with RECORD_FIELDS), with the attack success rate."""
    records = [{field: record[field] for field in RECORD_FIELDS} for record in records]
    broken = sum(bool(r["broken"]) for r in records)
    return {"format": FORMAT, "version": VERSION,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "model": model, "method": method, "judge": judge, "settings": dict(settings),
            "seconds": round(seconds, 2), "n": len(records), "broken": broken,
            "attack_success_rate": broken / len(records) if records else None, "prompts": records}


def write_attack(folder: str | Path, result: Mapping[str, Any], overwrite: bool = False) -> Path:
    """Write `result` as FOLDER/attack.json, atomically (refused if it exists, unless `overwrite`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return write_json(folder / ATTACK_FILE, dict(result), overwrite=overwrite)


def read_attack(path: str | Path) -> dict[str, Any]:
    """An attack.json (or the folder holding one), checked: format, version and every record's fields and types."""
    path = Path(path)
    if path.is_dir():
        path = path / ATTACK_FILE
    content = read_json(path)  # errors name the file: missing, not UTF-8, not JSON, not an object
    if content.get("format") != FORMAT:
        raise AttackFileError(f"{path}: field format is {content.get('format')!r}, not {FORMAT!r}; pass the "
                              f"{ATTACK_FILE} that `enchtable attack` wrote")
    if content.get("version") != VERSION:
        raise AttackFileError(f"{path}: version {content.get('version')!r} is not {VERSION}, the one this version "
                              "of enchtable reads")
    records = content.get("prompts")
    if not isinstance(records, list):
        raise AttackFileError(f"{path}: field prompts must be a list of records")
    for i, record in enumerate(records):
        where = f"{path}: prompts[{i}]"
        if not isinstance(record, dict):
            raise AttackFileError(f"{where} is a {type(record).__name__}, not an object")
        missing = [f for f in RECORD_FIELDS if f not in record]
        if missing:
            raise AttackFileError(f"{where}: missing field(s) {', '.join(missing)}")
        for field in ("prompt", "suffix", "target", "response"):
            if not isinstance(record[field], str):
                raise AttackFileError(f"{where}.{field} must be a string, got {type(record[field]).__name__}")
        if not (isinstance(record["suffix_ids"], list)
                and all(isinstance(t, int) and not isinstance(t, bool) for t in record["suffix_ids"])):
            raise AttackFileError(f"{where}.suffix_ids must be a list of token ids")
        if not isinstance(record["broken"], bool):
            raise AttackFileError(f"{where}.broken must be true or false")
        loss = record["final_loss"]
        if not isinstance(loss, (int, float)) or isinstance(loss, bool) or not math.isfinite(loss):
            raise AttackFileError(f"{where}.final_loss must be a finite number, got {loss!r}")
    return content


def suffix_map(attack: str | Path | Mapping[str, Any]) -> dict[str, str]:
    """{prompt: suffix} of an attack.json (a path or its dict; a plain {prompt: suffix} mapping passes through).

    A prompt attacked twice keeps its first record's suffix (the file's order), so a replay is deterministic.
    """
    if isinstance(attack, (str, Path)):
        attack = read_attack(attack)
    if attack.get("format") != FORMAT:  # a plain mapping given from Python
        bad = [k for k, v in attack.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise EnchtableError(f"suffixes: expected {{prompt: suffix}} strings or an {ATTACK_FILE}; "
                                 f"entry {bad[0]!r} is not a string pair")
        return dict(attack)
    found: dict[str, str] = {}
    for record in attack["prompts"]:
        found.setdefault(record["prompt"], record["suffix"])
    return found
