"""Inference-time defenses (eval/defenses.py) against their formulas.

Self-Reminder: the token ids `generate` feeds the model equal the ChatML rendering of [system, user + reminder]
written out byte by byte (the byte tokenizer's ids are the bytes), and the system text moves into the user turn for
templates without a system role. SafeDecoding: the sample space, mixed distribution and chosen token equal a
float64 NumPy reading of the paper's definition (the smallest k whose two top-k sets share at least c tokens;
p_base + α(p_expert − p_base) there, ≤ 0 floored at 1e-8, renormalised), on hand-made numbers and on a rigged
pair of bigram models whose logits are known in closed form; after m tokens the base model's greedy choice.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import enchtable_jax
from enchtable_jax.errors import EnchtableError
from enchtable_jax.eval.defenses import MIXED_FLOOR, SELF_REMINDER, check_expert, remind, safedecoding_scores
from enchtable_jax.eval.generate import generate, generate_ids
from enchtable_jax.models.chat import render_prompts, system_turn_supported
from enchtable_jax.models.init import init_params, preset_config
from enchtable_jax.models.model import Model
from enchtable_jax.models.tokenizer import byte_level_tokenizer, load_tokenizer
from enchtable_jax.options import SafeDecodingOptions

GENERATE = importlib.import_module("enchtable_jax.eval.generate")
START, END = 257, 258  # <|im_start|>, <|im_end|> in the byte tokenizer; every other id is a byte
# Gemma-style: a system message is an error; and one that renders user and assistant turns only.
RAISING = ("{%- for m in messages %}{%- if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
           "{%- endif %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endfor %}"
           "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
DROPPING = ("{%- for m in messages if m['role'] != 'system' %}"
            "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endfor %}"
            "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def chatml_ids(*turns: tuple[str, str]) -> list[int]:
    """ChatML by hand: `<|im_start|>ROLE\\nTEXT<|im_end|>\\n` per turn, then the opened assistant turn."""
    ids: list[int] = []
    for role, text in (*turns, ("assistant", None)):
        ids += [START, *f"{role}\n".encode()]
        if text is not None:
            ids += [*text.encode(), END, *b"\n"]
    return ids


def test_self_reminder_ids_are_the_formula(byte_model, monkeypatch):
    """What `generate(reminder=...)` feeds the model: system = the reminder's system text, user = query + newline +
    reminder, in ChatML; without the reminder, the plain user turn."""
    model, tokenizer = byte_model
    fed = []
    monkeypatch.setattr(GENERATE, "complete", lambda m, t, ids, **o: fed.append(ids) or ["" for _ in ids])
    queries = ["How do I pick a lock?", "Name a colour."]
    generate(model, tokenizer, queries, reminder=SELF_REMINDER)
    generate(model, tokenizer, queries)
    assert fed[0] == [chatml_ids(("system", SELF_REMINDER.system), ("user", q + "\n" + SELF_REMINDER.reminder))
                      for q in queries]
    assert fed[1] == [chatml_ids(("user", q)) for q in queries]
    assert SELF_REMINDER.system.startswith("You should be a responsible AI assistant and should not generate harmful")
    assert SELF_REMINDER.reminder.startswith("Remember, you should be a responsible AI assistant")


def test_self_reminder_without_a_system_role(tmp_path):
    """Templates that refuse or drop a system message get the system text at the head of the user turn; a system
    message of the caller's own is kept, ours after it."""
    tokenizer = byte_level_tokenizer()
    query = "Say hi."
    user = f"{SELF_REMINDER.system}\n\n{query}\n{SELF_REMINDER.reminder}"
    for name, source in (("raising", RAISING), ("dropping", DROPPING)):
        path = tmp_path / f"{name}.jinja"
        path.write_text(source)
        assert not system_turn_supported(tokenizer, str(path))
        assert render_prompts(remind([query], tokenizer, str(path)), tokenizer, str(path)) == \
            [chatml_ids(("user", user))]
    assert system_turn_supported(tokenizer) and system_turn_supported(tokenizer, "plain")
    own = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": query}]
    assert remind([own], tokenizer) == [[{"role": "system", "content": "Be brief.\n" + SELF_REMINDER.system},
                                         {"role": "user", "content": query + "\n" + SELF_REMINDER.reminder}]]
    assert remind([own], tokenizer, str(tmp_path / "raising.jinja"))[0] == [
        {"role": "user", "content": f"Be brief.\n{SELF_REMINDER.system}\n\n{query}\n{SELF_REMINDER.reminder}"}]
    with pytest.raises(EnchtableError, match="must end with a user turn"):
        remind([[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]], tokenizer)


SCORES = jax.jit(safedecoding_scores)  # one compilation per shape instead of one per operation
# Hand-made step: base ranks tokens 0 > 1 > ... > 7; the expert 5 > 2 > 6 > 4 > 0 > 7 > 3 > 1.
P_BASE = np.array([0.40, 0.25, 0.15, 0.10, 0.05, 0.03, 0.015, 0.005])
P_EXPERT = np.array([0.05, 0.01, 0.12, 0.03, 0.08, 0.58, 0.09, 0.04])


@pytest.mark.parametrize("alpha,common,expected", [
    # c = 3: top-4 lists share {2} only, top-5 lists {0, 2, 4}. 3·p_e − 2·p_b = −0.65, 0.06, 0.14: token 0 is
    # floored, the rest renormalised over 0.20; token 4 wins, neither model's favourite.
    (3.0, 3, {0: MIXED_FLOOR / 0.2, 2: 0.06 / 0.2, 4: 0.14 / 0.2}),
    # c = 4: top-6 lists share {0, 2, 4, 5}; token 5 gets 3·0.58 − 2·0.03 = 1.68 of 1.88.
    (3.0, 4, {0: MIXED_FLOOR / 1.88, 2: 0.06 / 1.88, 4: 0.14 / 1.88, 5: 1.68 / 1.88}),
    # α = 0: the base model's probabilities, renormalised over the same space.
    (0.0, 3, {0: 0.40 / 0.60, 2: 0.15 / 0.60, 4: 0.05 / 0.60}),
])
def test_safedecoding_step_by_hand(alpha, common, expected):
    scores = SCORES(jnp.log(jnp.asarray([P_BASE], jnp.float32)) + 1.5,  # logits, any offset
                                 jnp.log(jnp.asarray([P_EXPERT], jnp.float32)), alpha, common)
    got = np.exp(np.asarray(scores[0], np.float64))
    want = np.zeros(8)
    for token, p in expected.items():
        want[token] = p
    np.testing.assert_allclose(got, want / want.sum(), rtol=2e-5, atol=1e-12)
    assert set(np.flatnonzero(np.isfinite(np.asarray(scores[0])))) == set(expected)


def oracle_distribution(base: np.ndarray, expert: np.ndarray, alpha: float, common: int) -> np.ndarray:
    """SafeDecoding's next-token distribution from one row of each model's logits, in float64, as the paper defines
    it: grow k until the two top-k sets share `common` tokens; mix, floor, renormalise there."""
    p_base, p_expert = (np.exp(x - x.max()) / np.exp(x - x.max()).sum() for x in (base, expert))
    order_base, order_expert = np.argsort(-base, kind="stable"), np.argsort(-expert, kind="stable")
    k = 1
    while len(set(order_base[:k]) & set(order_expert[:k])) < common:
        k += 1
    space = sorted(set(order_base[:k]) & set(order_expert[:k]))
    mixed = np.zeros_like(p_base)
    mixed[space] = np.maximum(p_base[space] + alpha * (p_expert[space] - p_base[space]), 0)
    mixed[space] = np.where(mixed[space] > 0, mixed[space], MIXED_FLOOR)
    return mixed / mixed.sum()


def test_safedecoding_scores_match_the_definition_on_random_logits():
    rng = np.random.default_rng(0)
    base, expert = rng.normal(0, 2, (6, 50)), rng.normal(0, 2, (6, 50))
    for alpha, common in ((3.0, 5), (1.0, 1), (0.5, 12), (10.0, 50)):
        got = np.exp(np.asarray(SCORES(jnp.asarray(base, jnp.float32), jnp.asarray(expert, jnp.float32), alpha,
                                       common), np.float64))
        want = np.stack([oracle_distribution(b, e, alpha, common) for b, e in zip(base, expert)])
        np.testing.assert_array_equal(got > 0, want > 0)  # the same sample space
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-9)


STATES = 64  # the tiny llama's hidden size: token t writes axis t % 64, so its next-token logits are a column


def bigram_pair(seed: int = 0) -> tuple[Model, Model, np.ndarray, np.ndarray]:
    """(base, expert, base table, expert table): tiny llamas whose logits after token t are table[t % 64], known
    in closed form. Attention and MLP outputs are zero, the embedding of t is the unit vector on axis t % 64, so the
    final RMSNorm scales it by 1/sqrt(1/64 + eps) and the head's column t % 64 (random, per model) is the logits."""
    config = preset_config("tiny", "llama")
    params = init_params(config, seed=0, std=0.01)
    for name in params:
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            params[name] = jnp.zeros_like(params[name])
    embed = np.zeros((config.vocab_size, config.hidden_size), np.float32)
    embed[np.arange(config.vocab_size), np.arange(config.vocab_size) % STATES] = 1.0
    scale = 1 / np.sqrt(1 / config.hidden_size + config.rms_norm_eps)
    rng = np.random.default_rng(seed)
    models, tables = [], []
    for spread in (0.2, 0.3):  # logits of spread ~1.6 and ~2.4: several tokens plausible per step
        head = rng.normal(0, spread, (config.vocab_size, config.hidden_size)).astype(np.float32)
        models.append(Model(config, {**params, "model.embed_tokens.weight": jnp.asarray(embed),
                                     "lm_head.weight": jnp.asarray(head)}))
        tables.append((head.astype(np.float64) * np.float32(scale)).T)  # [state, vocab]
    return models[0], models[1], tables[0], tables[1]


def oracle_tokens(prompt: list[int], base: np.ndarray, expert: np.ndarray, options: SafeDecodingOptions,
                  new: int, first_m: int | None = None) -> list[int]:
    """Greedy SafeDecoding on the bigram tables: the mixed distribution's argmax for m tokens (`first_m`, default
    the options'), then base's."""
    tokens, last = [], prompt[-1]
    for step in range(new):
        if step < (options.first_m if first_m is None else first_m):
            last = int(np.argmax(oracle_distribution(base[last % STATES], expert[last % STATES], options.alpha,
                                                     options.common_tokens)))
        else:
            last = int(np.argmax(base[last % STATES]))
        tokens.append(last)
    return tokens


def test_safedecoding_generation_follows_the_rule_then_the_base_model():
    """Greedy, batched (3 prompts in a 4-row batch, different lengths): the first m tokens are the mixed
    distribution's argmax, the rest the base model's; and the expert changes the answer (not vacuous)."""
    base, expert, base_table, expert_table = bigram_pair()
    prompts = [[5, 9, 70], [200], [33, 140]]
    new = 5
    for options in (SafeDecodingOptions(), SafeDecodingOptions(alpha=1.5, common_tokens=2)):  # one compilation
        got = generate_ids(base, prompts, max_new_tokens=new, batch_size=4, progress=False, expert=expert,
                           safedecoding=options)
        assert got == [oracle_tokens(p, base_table, expert_table, options, new) for p in prompts]
        plain = generate_ids(base, prompts, max_new_tokens=new, batch_size=4, progress=False)
        assert plain == [oracle_tokens(p, base_table, expert_table, options, new, first_m=0) for p in prompts]
        assert all(g[:options.first_m] != p[:options.first_m] for g, p in zip(got, plain))


def test_safedecoding_sampling_stays_in_the_sample_space():
    """Sampled: every first token lies in the step's sample space, never on a floored token, and varies by row."""
    base, expert, base_table, expert_table = bigram_pair()
    options = SafeDecodingOptions(alpha=1.0, first_m=1, common_tokens=8)
    prompts = [[7 + 64 * k, 7] for k in range(3)] * 16  # 48 rows, all with state 7
    got = generate_ids(base, prompts, max_new_tokens=1, temperature=1.0, batch_size=64, progress=False, expert=expert,
                       safedecoding=options)
    allowed = oracle_distribution(base_table[7], expert_table[7], options.alpha, options.common_tokens)
    firsts = [g[0] for g in got]
    assert all(allowed[t] > 1e-6 for t in firsts)
    assert len(set(firsts)) > 1


def test_expert_vocabulary_and_options_are_checked(byte_model, tmp_path):
    model, tokenizer = byte_model
    wider = Model(dataclasses.replace(model.config, vocab_size=300), {})
    wide_folder = tmp_path / "wide"
    wide_folder.mkdir()
    (wide_folder / "config.json").write_text('{"model_type": "llama", "vocab_size": 300, "hidden_size": 64, '
                                             '"intermediate_size": 128, "num_hidden_layers": 2, '
                                             '"num_attention_heads": 4, "num_key_value_heads": 2}')
    with pytest.raises(EnchtableError, match=f"vocab_size 300 in {wide_folder}/config.json, 264 in "
                                             f"{model.source}/config.json"):
        check_expert(model, tokenizer, wide_folder)
    with pytest.raises(EnchtableError, match="vocab_size 300 in the model in memory"):
        generate_ids(model, [[1]], expert=wider, progress=False)
    extra = byte_level_tokenizer()
    extra.add_tokens(["<|extra|>"])
    extra.save_pretrained(tmp_path / "extra-tokenizer")
    expert = enchtable_jax.load(enchtable_jax.save(model, tmp_path / "expert", like=tmp_path / "extra-tokenizer"))
    with pytest.raises(EnchtableError, match=f"{tmp_path}/expert/tokenizer.json \\(260 tokens\\) and "
                                             f"{model.source}/tokenizer.json \\(259 tokens\\) differ on 1 "
                                             "token\\(s\\), e.g. '<\\|extra\\|>': id 259 vs none"):
        check_expert(model, load_tokenizer(model.source, "the test"), expert)
    with pytest.raises(EnchtableError, match="option common_tokens must be at most the vocabulary's 264 tokens"):
        check_expert(model, tokenizer, model, SafeDecodingOptions(common_tokens=265))
    check_expert(model, tokenizer, model, SafeDecodingOptions(common_tokens=264))
    for field, value, range_ in (("alpha", -1.0, "non-negative"), ("first_m", 0, "positive"),
                                 ("common_tokens", 2.5, "positive")):
        with pytest.raises(EnchtableError, match=f"^option {field} must be {range_}"):
            SafeDecodingOptions(**{field: value})
    with pytest.raises(EnchtableError, match="SafeDecoding options were given without an expert"):
        generate_ids(model, [[1]], safedecoding=SafeDecodingOptions(), progress=False)


def test_evaluate_applies_the_defense_to_every_set_and_records_it(byte_model, tmp_path, monkeypatch):
    """Safety, jailbreak-free utility sets alike get the defense's `generate` keywords; eval.json's settings and the
    summary name it. (Generation itself is replaced: what it does with the keywords is tested above.)"""
    from enchtable_jax.eval import pipeline

    model, tokenizer = byte_model
    calls = []
    monkeypatch.setattr(pipeline, "generate", lambda m, t, prompts, **o: calls.append(o) or ["Sorry."] * len(prompts))
    sets = {"prompt_sets": {"harm": ["q"]}, "qa_sets": {"qa": [{"question": "2+2?", "answer": "4"}]},
            "humaneval_sets": {}}
    result = pipeline.evaluate(model, tokenizer, **sets, defense="self-reminder", out=tmp_path / "reminder")
    assert [c["reminder"] for c in calls] == [SELF_REMINDER, SELF_REMINDER]
    assert result["settings"]["defense"] == "self-reminder"
    assert result["settings"]["self_reminder"] == {"system": SELF_REMINDER.system, "reminder": SELF_REMINDER.reminder,
                                                   "separator": "\n"}
    assert "defense: self-reminder" in pipeline.summary_table(result)
    calls.clear()
    options = SafeDecodingOptions(alpha=2.0)
    result = pipeline.evaluate(model, tokenizer, **sets, defense="safedecoding", expert=model.source,
                               safedecoding=options, out=tmp_path / "safedecoding")
    assert len(calls) == 2 and all(c["safedecoding"] == options and c["expert"].source == model.source for c in calls)
    written = json.loads((tmp_path / "safedecoding" / "eval.json").read_text())["settings"]
    assert written["defense"] == "safedecoding" and written["expert"] == str(model.source)
    assert written["safedecoding"] == {"alpha": 2.0, "first_m": 2, "common_tokens": 5}
    calls.clear()
    assert pipeline.evaluate(model, tokenizer, **sets)["settings"]["defense"] is None
    assert all("reminder" not in c and "expert" not in c for c in calls)
    for kwargs, message in (({"defense": "paraphrase"}, "unknown defense 'paraphrase'"),
                            ({"defense": "safedecoding"}, "defense safedecoding needs an expert"),
                            ({"expert": model.source}, "read only with defense safedecoding"),
                            ({"defense": "self-reminder", "safedecoding": options}, "read only with defense")):
        with pytest.raises(EnchtableError, match=message):
            pipeline.evaluate(model, tokenizer, **sets, **kwargs)


def test_cli_defense_flags(tmp_path, capsys):
    """--expert without --defense safedecoding, it without --expert, or a --safedecoding-* value without it: one line,
    exit 2. The flags' defaults are SafeDecodingOptions' declared ones."""
    from enchtable_jax.cli import _options_from, build_parser, main

    base = ["eval", "--model", str(tmp_path / "m"), "--prompts", str(tmp_path / "p.json"), "--out", str(tmp_path / "o")]
    for extra, message in ((["--expert", "e"], "--expert is read only with --defense safedecoding"),
                           (["--defense", "self-reminder", "--expert", "e"], "--expert is read only with"),
                           (["--defense", "safedecoding"], "--defense safedecoding needs --expert DIR"),
                           (["--safedecoding-alpha", "1"], "--safedecoding-\\* options are read only with")):
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("enchtable eval: error: ")
        assert re.search(message, err), err
    args = build_parser().parse_args(base)
    assert _options_from(args, SafeDecodingOptions) == SafeDecodingOptions() and args.defense is None
    args = build_parser().parse_args(base + ["--defense", "safedecoding", "--expert", "e", "--safedecoding-first-m",
                                             "4", "--safedecoding-common-tokens", "7"])
    assert _options_from(args, SafeDecodingOptions) == SafeDecodingOptions(first_m=4, common_tokens=7)
    with pytest.raises(SystemExit):
        build_parser().parse_args(base + ["--safedecoding-alpha", "-1"])
    assert "must be non-negative" in capsys.readouterr().err
