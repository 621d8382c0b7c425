"""The demo's world: tokenizer round trips, the refusal sentence the judge must recognise, held-out sets
that no training set contains, and a pure function of the seed."""

from __future__ import annotations

import pytest

from enchtable_jax.demo import world as w
from enchtable_jax.models.chat import render
from enchtable_jax.eval.judge import is_refusal


@pytest.fixture(scope="module")
def tokenizer():
    return w.word_tokenizer()


@pytest.fixture(scope="module")
def world():
    return w.make_world(0)


def _words(pairs):
    return {word for p in pairs for word in (p.prompt + " " + p.answer).split()}


def test_every_word_has_an_id_and_decodes_back(tokenizer, world):
    vocab = set(tokenizer.get_vocab())
    for pairs in (world.base, world.aligned, world.task, world.eval_harmful, world.eval_task, world.eval_skill):
        assert _words(pairs) <= vocab
    ids = tokenizer(w.REFUSAL)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == w.REFUSAL


def test_the_default_judge_recognises_the_refusal_and_not_the_compliance():
    assert is_refusal(w.REFUSAL)
    assert not is_refusal(w.COMPLY.format(x="cyanide"))


def test_chat_template_targets_are_the_answers(tokenizer, world):
    pair = world.aligned[0]
    examples, _ = render([[{"role": "user", "content": pair.prompt}, {"role": "assistant", "content": pair.answer}]],
                             tokenizer, 64)
    targets = [int(i) for i, m in zip(examples[0].input_ids, examples[0].loss_mask) if m]
    assert tokenizer.decode(targets[:-1]) == pair.answer
    assert targets[-1] == tokenizer.convert_tokens_to_ids(w.IM_END)


def test_held_out_harmful_prompts_are_new_in_topic_and_template(world):
    requests = [p.prompt for p in world.base + world.aligned + world.task + world.harmful
                if not p.answer.startswith("a ")]  # every training request except glossary entries
    for topic in w.DANGEROUS_HELDOUT + w.HARMLESS_HELDOUT + w.DANGEROUS_VALIDATION + w.HARMLESS_VALIDATION:
        assert not any(topic in r.split() for r in requests), topic
    trained = {p.prompt for p in world.base + world.aligned + world.task + world.harmful}
    for template in w.HOWTO_HELDOUT:
        for topic in w.DANGEROUS_TRAIN:
            assert template.format(x=topic) not in trained
    assert {p.prompt.split()[-1] for p in world.eval_harmful} == set(w.DANGEROUS_HELDOUT)


def test_validation_prompts_are_disjoint_from_evaluation_and_training(world):
    validation = {p.prompt for p in world.val_harmful + world.val_harmless}
    evaluated = {p.prompt for p in world.eval_harmful + world.eval_harmless}
    trained = {p.prompt for p in world.base + world.aligned + world.task + world.harmful}
    assert len(validation) == 2 * len(w.DANGEROUS_VALIDATION) * len(w.HOWTO_HELDOUT)
    assert not validation & evaluated and not validation & trained
    assert {p.prompt.split()[-1] for p in world.val_harmful} == set(w.DANGEROUS_VALIDATION)


def test_held_out_task_and_skill_items_are_absent_from_training(world):
    trained = {p.prompt for p in world.base + world.aligned + world.task}
    assert not trained & {p.prompt for p in world.eval_task + world.eval_skill}
    lists = {p.prompt.split(" : ")[1] for p in world.task + world.base if " : " in p.prompt}
    assert not lists & {p.prompt.split(" : ")[1] for p in world.eval_task}


def test_the_world_is_a_pure_function_of_the_seed(world):
    assert w.make_world(0) == world
    assert w.make_world(1) != world


def test_attack_words_are_the_worlds_and_the_attack_token_moves_no_id(tokenizer, world):
    """The jailbreak templates and Self-Reminder's wording use known words only (no `<unk>`), every filled held-out
    prompt fits 24 tokens in the chat template, and "!" (GCG's initial suffix) is the last id, in no data set."""
    from enchtable_jax.eval.jailbreaks import template_set, wrap
    from enchtable_jax.models.chat import render_prompts

    templates = template_set(w.JAILBREAKS).templates
    assert [t.name for t in templates] == list(w.JAILBREAKS) and all(len(t.pieces) >= 2 for t in templates)
    filled = wrap(templates, [p.prompt for p in world.eval_harmful])
    ids = render_prompts(filled + [w.REMINDER.system + " " + w.REMINDER.reminder], tokenizer)
    assert tokenizer.unk_token_id not in {i for row in ids for i in row}
    assert max(len(row) for row in ids[:-1]) <= 24
    vocab = tokenizer.get_vocab()
    assert vocab[w.ATTACK_INIT] == len(vocab) - 1 == 4 + len(w.vocabulary())
    assert [vocab[word] for word in w.vocabulary()] == list(range(4, 4 + len(w.vocabulary())))
    assert w.ATTACK_INIT not in _words(world.base + world.aligned + world.task + world.harmful)
