"""Prompt-set and record files in the shapes public sets ship in, and the errors for unusable ones."""

from __future__ import annotations

import json

import pytest

from enchtable_jax.eval.prompts import PromptFileError, load_prompts, load_records


def write(path, value, jsonl=False):
    path.write_text("\n".join(json.dumps(v) for v in value) + "\n" if jsonl else json.dumps(value))
    return path


def test_shapes(tmp_path):
    assert load_prompts(write(tmp_path / "a.json", ["x", "y"])) == ["x", "y"]
    objects = [{"prompt": "p"}, {"question": "q", "category": "c"}, {"goal": "g", "target": "t"},
               {"instruction": "i"}, {"behavior": "b"}]
    assert load_prompts(write(tmp_path / "b.json", objects)) == ["p", "q", "g", "i", "b"]
    nested = {"Crime": {"Drugs": ["d1", "d2"], "Theft": ["t1"]}, "Hate": ["h1", {"question": "h2"}]}
    assert load_prompts(write(tmp_path / "c.json", nested)) == ["d1", "d2", "t1", "h1", "h2"]
    assert load_prompts(write(tmp_path / "d.jsonl", ["x", {"prompt": "y"}], jsonl=True)) == ["x", "y"]
    assert load_prompts(write(tmp_path / "e.jsonl", [{"prompt": "only"}], jsonl=True)) == ["only"]
    assert load_prompts(tmp_path / "c.json", limit=2) == ["d1", "d2"]


def test_real_sets(shared_data):
    assert len(load_prompts(shared_data / "advbench.json")) == 520
    catqa = load_prompts(shared_data / "catqa_english.json")
    assert len(catqa) == 550 and all(isinstance(p, str) and p for p in catqa)


def test_prompt_errors(tmp_path):
    with pytest.raises(PromptFileError, match=r"b.json\[1\]: object with fields \['text'\] has no string field among "
                                              "prompt, question"):
        load_prompts(write(tmp_path / "b.json", [{"prompt": "ok"}, {"text": "no"}]))
    with pytest.raises(PromptFileError, match=r"\[0\]: a int; expected a string"):
        load_prompts(write(tmp_path / "c.json", [3]))
    with pytest.raises(PromptFileError, match=r"prompt\(s\) \[1\] are empty"):
        load_prompts(write(tmp_path / "d.json", ["a", " "]))
    (tmp_path / "e.jsonl").write_text('"a"\n{broken\n')
    with pytest.raises(PromptFileError, match="e.jsonl:2: invalid JSON"):
        load_prompts(tmp_path / "e.jsonl")
    with pytest.raises(PromptFileError, match="file not found"):
        load_prompts(tmp_path / "missing.json")
    with pytest.raises(PromptFileError, match="top level is a str"):
        load_prompts(write(tmp_path / "f.json", "just text"))


def test_records(tmp_path):
    rows = [{"question": "1+1?", "answer": "2"}, {"question": "2+2?", "answer": 4}]
    assert load_records(write(tmp_path / "qa.jsonl", rows, jsonl=True), ("question", "answer")) == rows
    assert load_records(write(tmp_path / "qa.json", rows), ("question", "answer"), limit=1) == rows[:1]
    with pytest.raises(PromptFileError, match=r"bad.jsonl:2: missing field\(s\) answer \(has question\)"):
        load_records(write(tmp_path / "bad.jsonl", [rows[0], {"question": "?"}], jsonl=True), ("question", "answer"))
    with pytest.raises(PromptFileError, match="record 0: a str"):
        load_records(write(tmp_path / "s.json", ["x"]), ("question", "answer"))
