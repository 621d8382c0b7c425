"""Training data: record parsing and its errors (located by file, line and field), the data hash, the seeded
length-grouped epoch order and batch collation."""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import numpy as np
import pytest

from enchtable_jax.models.chat import DataError, Example
from enchtable_jax.training.data import collate, data_hash, epoch_batches, padded_width, read_records
from records import MULTI, SINGLE, write_jsonl, write_text


def test_alpaca_json_and_jsonl(tmp_path):
    records = [{"instruction": "Do X", "output": "Done"}, {"instruction": "Summarize", "input": "text", "output": "ok"},
               {"instruction": "Y", "input": "", "output": "z", "extra": 1}]
    expected = [[{"role": "user", "content": "Do X"}, {"role": "assistant", "content": "Done"}],
                [{"role": "user", "content": "Summarize\n\ntext"}, {"role": "assistant", "content": "ok"}],
                [{"role": "user", "content": "Y"}, {"role": "assistant", "content": "z"}]]
    assert read_records(write_text(tmp_path, "a.json", json.dumps(records, indent=1))) == expected
    assert read_records(write_jsonl(tmp_path, records)) == expected


def test_chat_form_and_blank_lines(tmp_path):
    chat = {"messages": [{"role": "system", "content": "s", "name": "ignored"}, *MULTI[1:]]}
    path = write_text(tmp_path, "c.jsonl", "\n" + json.dumps(chat) + "\n\n" + json.dumps({"messages": SINGLE}) + "\n")
    assert read_records(path) == [[{"role": "system", "content": "s"}, *MULTI[1:]], SINGLE]


def test_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps([{"messages": SINGLE}]).encode())
    assert read_records(path) == [SINGLE]


GOOD = {"instruction": "i", "output": "o"}


@pytest.mark.parametrize("record,fragments", [
    ({"instruction": "i"}, ["field 'output'", "missing", "string"]),
    ({"instruction": 3, "output": "o"}, ["field 'instruction'", "int", "string"]),
    ({"instruction": "i", "input": ["x"], "output": "o"}, ["field 'input'", "list"]),
    ({"messages": "hi"}, ["field 'messages'", "non-empty list"]),
    ({"messages": []}, ["field 'messages'", "non-empty list"]),
    ({"messages": [SINGLE[0], "hi"]}, ["field 'messages[1]'", "str"]),
    ({"messages": [{"role": "tool", "content": "x"}, SINGLE[1]]}, ["field 'messages[0].role'", "'tool'", "system"]),
    ({"messages": [SINGLE[0], {"role": "assistant"}]}, ["field 'messages[1].content'", "missing"]),
    ({"messages": [SINGLE[1], SINGLE[0]]}, ["field 'messages[0].role'", "'assistant'"]),
    ({"messages": [SINGLE[0]]}, ["field 'messages[0].role'", "'user'", "last message must be the assistant"]),
    ({"prompt": "p", "response": "r"}, ["['prompt', 'response']", "instruction", "messages"]),
    (["instruction", "output"], ["JSON object", "list"]),
])
def test_malformed_records_are_located(tmp_path, record, fragments):
    path = write_jsonl(tmp_path, [GOOD, record, GOOD])
    with pytest.raises(DataError) as e:
        read_records(path)
    assert f"{path}:2:" in str(e.value)
    for fragment in fragments:
        assert fragment in str(e.value)
    as_json = write_text(tmp_path, "data.json", json.dumps([GOOD, GOOD, record]))
    with pytest.raises(DataError, match="record 2") as e:
        read_records(as_json)
    assert str(as_json) in str(e.value) and fragments[0] in str(e.value)


def test_invalid_json_is_located(tmp_path):
    with pytest.raises(DataError, match=r"bad\.jsonl:2: invalid JSON"):
        read_records(write_text(tmp_path, "bad.jsonl", json.dumps(GOOD) + "\n{'single': 'quotes'}\n"))
    with pytest.raises(DataError, match=r"bad\.json:3: invalid JSON"):
        read_records(write_text(tmp_path, "bad.json", '[\n{"instruction": "i", "output": "o"},\n{oops}\n]'))


@pytest.mark.parametrize("text", ["", "\n \n", "[]"])
def test_empty_data(tmp_path, text):
    with pytest.raises(DataError, match="no records"):
        read_records(write_text(tmp_path, "empty.jsonl", text))


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_records(tmp_path / "nope.jsonl")


def test_data_hash(tmp_path):
    assert data_hash(write_text(tmp_path, "abc.txt", "abc")) == \
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    blob = bytes(range(256)) * 10_000
    (tmp_path / "blob").write_bytes(blob)
    assert data_hash(tmp_path / "blob") == hashlib.sha256(blob).hexdigest()


def test_hand_written_grouped_order():
    lengths = [50, 10, 40, 20, 30, 0]
    for seed in range(5):
        batches = epoch_batches(lengths, 2, seed=seed, epoch=0)
        assert sorted(batches) == [[2, 0], [3, 4], [5, 1]]  # ascending lengths 0,10 | 20,30 | 40,50
        assert epoch_batches(lengths, 6, seed=seed, epoch=3) == [[5, 1, 3, 4, 2, 0]]


def test_order_is_a_deterministic_permutation():
    lengths = list(np.random.default_rng(0).integers(1, 500, 1003))
    for group in (True, False):
        batches = epoch_batches(lengths, 8, seed=7, epoch=2, group_by_length=group)
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(1003))
        assert Counter(len(b) for b in batches) == Counter({8: 125, 3: 1})
        assert batches == epoch_batches(lengths, 8, seed=7, epoch=2, group_by_length=group)
        assert batches != epoch_batches(lengths, 8, seed=7, epoch=3, group_by_length=group)
        assert batches != epoch_batches(lengths, 8, seed=8, epoch=2, group_by_length=group)


def test_grouping_gathers_similar_lengths():
    lengths = np.random.default_rng(1).integers(1, 2000, 2000)
    spread = {g: np.mean([np.ptp(lengths[b]) for b in epoch_batches(lengths.tolist(), 8, 0, 0, g)])
              for g in (True, False)}
    assert spread[True] < 0.1 * spread[False]
    # within a window of 50 batches the batches tile the sorted lengths: their ranges do not overlap
    window = sorted((lengths[b].min(), lengths[b].max()) for b in epoch_batches(lengths[:400].tolist(), 8, 0, 0))
    assert all(hi <= next_lo for (_, hi), (next_lo, _) in zip(window, window[1:]))


def test_small_and_bad_inputs():
    assert epoch_batches([], 4, 0, 0) == []
    assert epoch_batches([3], 4, 0, 0) == [[0]]
    with pytest.raises(ValueError, match="batch_size"):
        epoch_batches([1, 2], 0, 0, 0)


def _example(n, targets):
    return Example(np.arange(1, n + 1, dtype=np.int32), np.array([i in targets for i in range(n)], np.int8))


def test_padded_widths_are_64_then_eight_per_octave():
    # oracle: the width set written out (64, then 2^k + j 2^k/8 for j = 1..8), the smallest one that fits
    widths = sorted({64} | {2 ** k + j * 2 ** k // 8 for k in range(6, 14) for j in range(1, 9)})
    for longest in range(1, 8193):
        expected = next(w for w in widths if w >= longest)
        assert padded_width(longest) == expected, longest
        assert longest <= 64 or (expected - longest) / expected < 1 / 8
    assert padded_width(142) == 144 and padded_width(142, max_length=140) == 140
    assert len({padded_width(n) for n in range(1, 2049)}) == 41  # compilations at most, up to 2048 tokens


def test_collate_pads_right_to_the_padded_width():
    examples = [_example(3, {2}), _example(70, {5, 69}), _example(10, set())]
    batch = collate(examples, [2, 0, 1], pad_id=0)
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {k: ((3, 72), np.int32) for k in batch}
    assert batch["input_ids"][1].tolist() == [1, 2, 3] + [0] * 69
    assert batch["attention_mask"].sum(1).tolist() == [10, 3, 70]
    assert batch["loss_mask"][1].tolist() == [0, 0, 1] + [0] * 69
    assert np.flatnonzero(batch["loss_mask"][2]).tolist() == [5, 69]
    assert collate(examples, [0], pad_id=9)["input_ids"].tolist() == [[1, 2, 3] + [9] * 61]


def test_collate_caps_at_max_length_and_pads_rows():
    examples = [_example(3, {2}), _example(70, {5})]
    batch = collate(examples, [1, 0], pad_id=5, max_length=71, rows=4)
    assert batch["input_ids"].shape == (4, 71)
    assert (batch["input_ids"][2:] == 5).all() and not batch["attention_mask"][2:].any()
    assert not batch["loss_mask"][2:].any()
    with pytest.raises(ValueError, match="rows=1"):
        collate(examples, [0, 1], pad_id=0, rows=1)
    with pytest.raises(ValueError, match="max_length=50"):
        collate(examples, [0, 1], pad_id=0, max_length=50)
