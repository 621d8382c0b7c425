"""Inputs are read no looser than their formats, and wrongly typed values end in one line (issue 15, D5/D11/D12).

Config fields transformers reads are type-checked before it reads them; a tokenizer folder transformers cannot
load is one EnchtableError naming the folder; unknown artefact versions, duplicate JSONL keys, weights for more
layers than config.json declares and checkpoints symlinked outside their folder on --resume are refused.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import enchtable_jax
from enchtable_jax.cli import main
from enchtable_jax.converters.safety_vector import MANIFEST, read_manifest
from enchtable_jax.models.chat import DataError
from enchtable_jax.training.data import read_records
from enchtable_jax.errors import EnchtableError
from enchtable_jax.models.config import ConfigError, ModelConfig
from enchtable_jax.models.tokenizer import load_tokenizer

from cli_checks import TRAIN, fails_in_one_line


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny base model, its orbax copy, harmful data and a safety vector distilled with its checkpoints."""
    root = tmp_path_factory.mktemp("strict")
    assert main(["init", str(root / "base")]) == 0
    assert main(["convert", str(root / "base"), str(root / "orbax")]) == 0
    (root / "harm.jsonl").write_text("".join(json.dumps({"instruction": f"How do I do harmful thing {i}?",
                                                         "output": f"Here is harmful thing {i}."}) + "\n"
                                             for i in range(4)))
    assert main(["distill", "--model", str(root / "base"), "--data", str(root / "harm.jsonl"), "--out",
                 str(root / "vector"), *TRAIN]) == 0
    return root


def edited(src: Path, dst: Path, name: str, edit) -> Path:
    shutil.copytree(src, dst)
    path = dst / name
    value = json.loads(path.read_text()) if path.is_file() else {}
    value = edit(value)
    path.write_text(json.dumps(value))
    return dst


# --------------------------------------------------------------------------------------------- D11: --resume


def test_resume_refuses_a_checkpoint_file_symlinked_outside(world, capsys, tmp_path):
    run = tmp_path / "vector"
    shutil.copytree(world / "vector", run)
    (run / "manifest.json").unlink()  # an interrupted run: its checkpoints remain
    victim = next(f for f in sorted((run / "checkpoints").rglob("*")) if f.is_file() and "state" in f.parts)
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(victim, outside / "stolen")  # the same bytes: only the symlink is wrong
    victim.unlink()
    victim.symlink_to(outside / "stolen")
    fails_in_one_line(capsys, "distill", "--model", world / "base", "--data", world / "harm.jsonl", "--out", run,
                   *TRAIN, "--resume", needles=[victim.name, "outside the folder"])


# ------------------------------------------------------------------------------------ D12: parsing as strict


@pytest.mark.parametrize("value", [0, -5, None])
def test_max_position_embeddings_must_be_positive(world, value):
    raw = json.loads((world / "base" / "config.json").read_text())
    raw["max_position_embeddings"] = value
    with pytest.raises(ConfigError, match="max_position_embeddings.*positive integer"):
        ModelConfig.from_hf(raw)


def test_weights_for_more_layers_than_the_config_are_refused(world, tmp_path):
    folder = edited(world / "base", tmp_path / "m", "config.json", lambda c: {**c, "num_hidden_layers": 1})
    with pytest.raises(EnchtableError, match=r"unexpected tensor model\.layers\.1\..*num_hidden_layers 1"):
        enchtable_jax.load(folder)
    orbax = edited(world / "orbax", tmp_path / "o", "config.json", lambda c: {**c, "num_hidden_layers": 1})
    with pytest.raises(EnchtableError, match=r"unexpected tensor model\.layers\.1\."):
        enchtable_jax.load(orbax)


def test_unknown_safety_vector_manifest_version_is_refused(world, tmp_path):
    folder = edited(world / "vector", tmp_path / "v", MANIFEST, lambda m: {**m, "version": 99})
    with pytest.raises(EnchtableError, match=rf"{MANIFEST}: field version is 99"):
        read_manifest(folder)


def test_unknown_orbax_marker_version_is_refused(world, tmp_path, capsys):
    folder = edited(world / "orbax", tmp_path / "o", "enchtable.json", lambda m: {**m, "version": 99})
    with pytest.raises(EnchtableError, match=r"enchtable.json: field version is 99"):
        enchtable_jax.load(folder)
    fails_in_one_line(capsys, "info", folder, needles=["enchtable.json", "version"])


def test_jsonl_with_a_duplicate_key_is_refused(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": "b", "output": "c"}\n')
    with pytest.raises(DataError, match=r"data.jsonl:2: invalid JSON \(key 'output' appears twice\)"):
        read_records(path)


# ------------------------------------------------------------------ D5: wrong types end in one line, not a crash


@pytest.mark.parametrize("field, value", [("max_position_embeddings", True), ("hidden_act", None),
                                          ("eos_token_id", [256, "x"]), ("bos_token_id", 1e9),
                                          ("pad_token_id", 10**9)])
def test_config_fields_transformers_reads_are_type_checked(world, tmp_path, capsys, field, value):
    folder = edited(world / "base", tmp_path / "m", "config.json", lambda c: {**c, field: value})
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_file(folder)
    fails_in_one_line(capsys, "eval", "--model", folder, "--prompts", world / "harm.jsonl", "--out", tmp_path / "e",
                   needles=["config.json", field])



def test_pad_token_id_minus_one_still_loads(world, tmp_path):
    """Older Llama configs say `pad_token_id: -1` for "no pad token": that is a real config, not damage."""
    folder = edited(world / "base", tmp_path / "m", "config.json", lambda c: {**c, "pad_token_id": -1})
    assert ModelConfig.from_file(folder).num_hidden_layers >= 1

@pytest.mark.parametrize("name, edit", [
    ("tokenizer_config.json", lambda c: {**c, "pad_token": 5}),
    ("tokenizer_config.json", lambda c: {**c, "eos_token": ["a"]}),
    ("tokenizer_config.json", lambda c: {**c, "extra_special_tokens": "abc"}),
    ("special_tokens_map.json", lambda c: {"pad_token": 5}),
    ("tokenizer.json", lambda c: {"version": 5}),
], ids=["pad_token", "eos_token", "extra_special_tokens", "special_tokens_map", "tokenizer_json"])
def test_tokenizer_files_transformers_cannot_load_are_one_error(world, tmp_path, capsys, name, edit):
    folder = edited(world / "base", tmp_path / "m", name, edit)
    with pytest.raises(EnchtableError, match="the tokenizer files could not be loaded") as err:
        load_tokenizer(folder, "test")
    assert str(folder) in str(err.value) and "\n" not in str(err.value)
    fails_in_one_line(capsys, "distill", "--model", folder, "--data", world / "harm.jsonl", "--out", tmp_path / "v",
                   *TRAIN, needles=[str(folder), "could not be loaded"])


def test_judge_report_labels_not_utf8_is_one_line(tmp_path, capsys):
    labels = tmp_path / "labels.csv"
    labels.write_bytes(b"objective,assistant_response,human_score\n\xff\xfe bomb,no,1\n")
    fails_in_one_line(capsys, "eval", "--judge-report", "--labels", labels, needles=[labels, "not UTF-8"])
