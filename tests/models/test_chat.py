"""Chat rendering: template choice, response-only loss masks (checked by decoding the masked tokens),
control tokens kept as text, truncation, and rendered examples collating into a training batch."""

from __future__ import annotations

import numpy as np
import pytest
import transformers

from enchtable_jax.models.chat import DataError, Example, render, resolve_template
from enchtable_jax.models.tokenizer import TEMPLATES, byte_level_tokenizer
from enchtable_jax.training.data import collate
from records import MULTI, SINGLE, write_text


@pytest.fixture(scope="module")
def tok():
    return byte_level_tokenizer()


def _byte_count(text):
    """Tokens of `text` under the byte tokenizer: UTF-8 bytes, each ChatML marker one token."""
    return len(text.encode()) - 11 * text.count("<|im_start|>") - 9 * text.count("<|im_end|>")


def _target_runs(tokenizer, example):
    """Decoded text of each maximal run of target tokens."""
    runs, current = [], []
    for token, target in zip(example.input_ids.tolist(), example.loss_mask.tolist()):
        if target:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(r) for r in runs]


def test_missing_template_names_the_folder_and_the_flag(tmp_path):
    folder = tmp_path / "base-model"
    byte_level_tokenizer(chat_template=None).save_pretrained(folder)
    bare = transformers.AutoTokenizer.from_pretrained(folder)
    with pytest.raises(DataError) as e:
        resolve_template(bare)
    assert str(folder) in str(e.value) and "--template chatml|llama3|plain|FILE.jinja" in str(e.value)
    with pytest.raises(DataError, match="no chat template"):
        render([SINGLE], bare, 64)
    assert resolve_template(bare, "plain") == TEMPLATES["plain"]


def test_template_choice(tok, tmp_path):
    assert resolve_template(tok) == tok.chat_template
    assert resolve_template(tok, "llama3") == TEMPLATES["llama3"]
    path = write_text(tmp_path, "mine.jinja", "{% for m in messages %}{{ m['content'] }}|{% endfor %}")
    assert resolve_template(tok, str(path)) == path.read_text()
    with pytest.raises(DataError, match="neither a built-in .*chatml, llama3, plain"):
        resolve_template(tok, "vicuna")
    with pytest.raises(DataError, match="empty"):
        resolve_template(tok, str(write_text(tmp_path, "empty.jinja", " \n")))


def test_single_turn_targets_are_the_response(tok):
    (ex,), stats = render([SINGLE], tok, 256)
    text = "<|im_start|>user\nHow do I pick a lock?<|im_end|>\n<|im_start|>assistant\nSure: first…<|im_end|>\n"
    assert tok.decode(ex.input_ids.tolist()) == text
    assert _target_runs(tok, ex) == ["Sure: first…<|im_end|>"]
    assert ex.input_ids.dtype == np.int32 and ex.loss_mask.dtype == np.int8 and len(ex) == _byte_count(text)
    assert stats.n_target_tokens == len("Sure: first…".encode()) + 1 and stats.n_tokens == len(ex)


def test_multi_turn_targets_are_every_response(tok):
    (ex,), _ = render([MULTI], tok, 512)
    assert _target_runs(tok, ex) == ["Hello 👋\n<|im_end|>", "  Yes, more.  <|im_end|>"]
    untargeted = tok.decode([t for t, m in zip(ex.input_ids.tolist(), ex.loss_mask.tolist()) if not m])
    assert untargeted == ("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                          "<|im_start|>assistant\n\n<|im_start|>user\nMore?<|im_end|>\n<|im_start|>assistant\n\n")


@pytest.mark.parametrize("name,end", [("plain", "<|endoftext|>"), ("llama3", "<|eot_id|>")])
def test_builtin_templates_mark_responses_and_their_end(tok, name, end):
    (ex,), _ = render([MULTI], tok, 1024, template=name)
    assert _target_runs(tok, ex) == ["Hello 👋\n" + end, "  Yes, more.  " + end]


def test_control_tokens_in_data_stay_text(tok):
    conv = [{"role": "user", "content": "a<|im_end|>b"}, {"role": "assistant", "content": "<|im_start|>x"}]
    (ex,), _ = render([conv], tok, 256)
    assert ex.input_ids.tolist().count(258) == 2 and ex.input_ids.tolist().count(257) == 2  # template's own only
    assert _target_runs(tok, ex) == ["<|im_start|>x<|im_end|>"]


def test_truncation_and_dropping(tok):
    long_answer = [SINGLE[0], {"role": "assistant", "content": "x" * 100}]
    long_prompt = [{"role": "user", "content": "p" * 100}, SINGLE[1]]
    examples, stats = render([SINGLE, long_answer, long_prompt], tok, 64)
    prompt_len = _byte_count("<|im_start|>user\nHow do I pick a lock?<|im_end|>\n<|im_start|>assistant\n")
    assert [len(e) for e in examples] == [_byte_count(tok.apply_chat_template(SINGLE, tokenize=False)), 64]
    assert int(examples[1].loss_mask.sum()) == 64 - prompt_len and examples[1].loss_mask[-1] == 1
    assert (stats.n_records, stats.n_examples, stats.n_truncated, stats.n_dropped) == (3, 2, 2, 1)
    assert stats.n_tokens == sum(len(e) for e in examples)
    assert stats.n_target_tokens == sum(int(e.loss_mask.sum()) for e in examples)
    assert stats.max_length_seen == len(tok.apply_chat_template(long_answer, return_dict=False))


def test_template_that_rewrites_history_is_refused(tok, tmp_path):
    counting = write_text(tmp_path, "counting.jinja",  # the message count changes every earlier turn's rendering
                      "{{ messages|length }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                      "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(DataError) as e:
        render([SINGLE], tok, 256, template=str(counting))
    assert "conversation 0" in str(e.value) and f"template file {counting}" in str(e.value)
    assert "rewrites earlier turns" in str(e.value) and "assistant message 1" in str(e.value)
    assert "--template" in str(e.value)


def test_template_errors_are_reported(tok, tmp_path):
    strict = write_text(tmp_path, "strict.jinja", "{% for m in messages %}{% if m['role'] == 'system' %}"
                    "{{ raise_exception('no system prompts') }}{% endif %}{{ m['content'] }}|{% endfor %}")
    with pytest.raises(DataError, match="conversation 1: template file .*no system prompts"):
        render([SINGLE, MULTI], tok, 256, template=str(strict))
    users_only = write_text(tmp_path, "users.jinja", "{% for m in messages %}{% if m['role'] == 'user' %}"
                        "{{ m['content'] }}|{% endif %}{% endfor %}")
    with pytest.raises(DataError, match="conversation 0: template file .*assistant message 1 as no tokens"):
        render([SINGLE], tok, 256, template=str(users_only))


def test_rendered_examples_collate_into_a_training_batch(tok):
    examples, stats = render([SINGLE, MULTI, SINGLE], tok, 512)
    batch = collate(examples, [0, 1, 2], tok.pad_token_id)
    # token t is predicted at t-1: every target has a predecessor, and real tokens carry all of them
    assert int(batch["loss_mask"][:, 1:].sum()) == stats.n_target_tokens
    assert not (batch["loss_mask"] & (1 - batch["attention_mask"])).any()


def test_example_checks_its_arrays():
    with pytest.raises(ValueError, match="equal"):
        Example(np.zeros(3, np.int32), np.zeros(2, np.int8))
    with pytest.raises(ValueError, match="int32"):
        Example(np.zeros(3, np.int64), np.zeros(3, np.int8))


SMOL_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


@pytest.mark.real
def test_smollm2_chat_template(smollm2_dir):
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    multi_turn = MULTI[:-1] + [{"role": "assistant", "content": "Yes, more.  "}]  # no leading space: see below
    (single, multi), stats = render([SINGLE, multi_turn], tokenizer, 512)
    assert tokenizer.decode(single.input_ids.tolist()) == (
        SMOL_SYSTEM + "<|im_start|>user\nHow do I pick a lock?<|im_end|>\n"
        "<|im_start|>assistant\nSure: first…<|im_end|>\n")
    # the default system prompt is context, not a target; responses end with <|im_end|>, SmolLM2's eos
    assert _target_runs(tokenizer, single) == ["Sure: first…<|im_end|>"]
    assert _target_runs(tokenizer, multi) == ["Hello 👋\n<|im_end|>", "Yes, more.  <|im_end|>"]
    assert tokenizer.eos_token == "<|im_end|>" and stats.n_dropped == 0
    (plain,), _ = render([SINGLE], tokenizer, 512, template="plain")
    assert _target_runs(tokenizer, plain) == ["Sure: first…<|im_end|>"]


@pytest.mark.real
def test_smollm2_boundary_merges_are_refused(smollm2_dir):
    # GPT-2 style pre-tokenization joins "\n" + " " across the end of the generation prompt: such a response
    # would train tokens that generation never sees, so rendering stops with the reason
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    leading_space = [SINGLE[0], {"role": "assistant", "content": "  Yes."}]
    with pytest.raises(DataError, match="conversation 0: the tokenizer merges text across a boundary of assistant "
                                         "message 1 .*strip it"):
        render([leading_space], tokenizer, 512)
