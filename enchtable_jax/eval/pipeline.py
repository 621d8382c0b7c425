"""One evaluation run: generate answers for every prompt set, judge the safety sets, score the utility sets,
and write `eval.json` (every prompt, response and verdict) plus a summary table.

Safety: unsafe rate = unsafe responses / judged responses per prompt set, greedy decoding by default,
the model's chat template. Utility: exact match on question/answer sets, pass@1 on HumanEval sets.
"""

from __future__ import annotations

import dataclasses
import datetime
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from enchtable_jax.converters.atomic import write_json
from enchtable_jax.converters.model_io import load
from enchtable_jax.converters.outputs import check_output, template_input
from enchtable_jax.errors import EnchtableError
from enchtable_jax.options import EVAL_OPTIONS, SafeDecodingOptions, check_values
from enchtable_jax.eval.defenses import DEFENSES, SELF_REMINDER, check_expert
from enchtable_jax.eval.generate import generate, resolve_tokenizer
from enchtable_jax.eval.jailbreaks import JailbreakTemplate, TemplateSet, score, summary_rows, template_set, wrap
from enchtable_jax.eval.judge import Judge, RefusalJudge
from enchtable_jax.eval.metrics import answer_matches, pass_at_1, unsafe_rate
from enchtable_jax.eval.suffixes import suffix_map, with_suffix

RESULT_FILE = "eval.json"
TEMPLATE_ROWS = 10  # per-template rows a summary table shows per set (the highest unsafe rates; eval.json has all)
# How a HumanEval problem is asked of a chat model; `humaneval_program` accepts a full function or a body.
HUMANEVAL_INSTRUCTION = ("Complete the following Python function. Reply with the complete function in a single "
                         "```python code block.\n\n```python\n{prompt}```")


def evaluate(model: Any, tokenizer: Any = None, prompt_sets: Mapping[str, Sequence[str]] | None = None, *,
             qa_sets: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
             humaneval_sets: Mapping[str, Sequence[Mapping[str, str]]] | None = None,
             judge: Judge | None = None, max_new_tokens: int = 128, template: str | None = None,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, batch_size: int = 16,
             suffixes: str | Path | Mapping[str, Any] | None = None,
             timeout: float = 10.0, out: str | Path | None = None, overwrite: bool = False,
             progress: bool | None = None, defense: str | None = None, expert: Any = None,
             safedecoding: SafeDecodingOptions | None = None,
             jailbreak_templates: str | Path | Mapping[str, str] | TemplateSet | None = None) -> dict[str, Any]:
    """Evaluate `model` (an `enchtable_jax.Model` or a folder) on safety prompt sets and utility sets.

    prompt_sets: {name: prompts}, judged by `judge` (default `RefusalJudge()`: unsafe = not refused).
    qa_sets: {name: [{question, answer}]}, scored by exact match (`metrics.answer_matches`).
    humaneval_sets: {name: [{task_id, prompt, test, entry_point}]}, scored by pass@1 in a subprocess.
    defense: an inference-time defense for every generation of the run, safety and utility sets alike
    (`eval/defenses.py`): "self-reminder", or "safedecoding" with `expert` (a model or folder with the model's
    tokenizer) and `safedecoding` (its parameters; default the paper's). Recorded in the result's settings.
    suffixes: an attack.json (`enchtable attack`), its dict, or {prompt: suffix}: each safety prompt that has a
    suffix there is also answered as `prompt + " " + suffix` (the attack's rendering; suffixes found on another
    model replay as transfer), judged against the plain prompt; prompts without one are skipped and counted.
    tokenizer: a transformers tokenizer, a folder, or None for the model's folder. out: a folder for
    `eval.json` (refused before any work if it exists there, unless `overwrite`, if the folder cannot be written,
    or if `eval.json` would be inside the model's or tokenizer's folder). Returns the result dict written there.
    jailbreak_templates: a template file or folder, {name: template text} or a loaded `TemplateSet`
    (`eval/jailbreaks.py`): every safety set is also answered with each prompt wrapped in each template (one
    `generate` call per set), judged against the plain prompt, and scored per template and as an attack success rate.
    """
    check_values(EVAL_OPTIONS, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                 batch_size=batch_size, timeout=timeout)
    replay = _suffix_replay(suffixes, prompt_sets or {})
    prompt_sets, qa_sets, humaneval_sets = prompt_sets or {}, qa_sets or {}, humaneval_sets or {}
    _check_defense(defense, expert, safedecoding)
    _check_set_names(prompt_sets, qa_sets, humaneval_sets)
    jailbreaks = template_set(jailbreak_templates) if jailbreak_templates is not None else None
    if jailbreaks is not None and not prompt_sets:
        raise EnchtableError("jailbreak templates wrap the safety prompt sets; give at least one prompt set")
    if out is not None:
        inputs = {"--model": model, "--tokenizer": tokenizer, "--template": template_input(template),
                  "--judge-model": getattr(judge, "model", None),
                  "--jailbreak-templates": jailbreaks.source if jailbreaks is not None else None}
        inputs["--expert"] = expert
        out = check_output(Path(out) / RESULT_FILE, inputs, overwrite, file=True).parent
    if isinstance(model, (str, Path)):
        model = load(model, progress=progress)
    tokenizer = resolve_tokenizer(model, tokenizer)
    judge = judge if judge is not None else RefusalJudge()
    options = {"max_new_tokens": max_new_tokens, "template": template, "temperature": temperature, "top_p": top_p,
               "seed": seed, "batch_size": batch_size, "progress": progress}
    guard, defended = _defense(model, tokenizer, defense, expert, safedecoding, progress)
    options |= guard
    start = time.perf_counter()
    safety = {name: _safety_set(model, tokenizer, prompts, judge, options) for name, prompts in prompt_sets.items()}
    if jailbreaks is not None:
        for name, prompts in prompt_sets.items():
            safety[name]["jailbreaks"] = _jailbreak_set(model, tokenizer, prompts, jailbreaks.templates, judge, options)
    utility = {name: _qa_set(model, tokenizer, records, options) for name, records in qa_sets.items()}
    utility |= {name: _humaneval_set(model, tokenizer, problems, options, timeout)
                for name, problems in humaneval_sets.items()}
    if replay is not None:
        for name, prompts in prompt_sets.items():
            safety[name]["suffixes"] = _suffix_set(model, tokenizer, prompts, replay, judge, options)
    result = {
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "model": str(model.source) if model.source is not None else None,
        "judge": judge.name,
        "settings": {k: v for k, v in options.items() if k not in ("progress", *guard)} | {"timeout": timeout}
                    | defended,
        "seconds": round(time.perf_counter() - start, 2),
        "summary": _with_suffix_rows(_summary_rows(safety, utility), safety),
        "safety": safety,
        "utility": utility,
        **({"suffixes": {"source": str(suffixes) if isinstance(suffixes, (str, Path)) else None,
                         "prompts": len(replay)}} if replay is not None else {}),
    }
    if jailbreaks is not None:
        result["jailbreak_templates"] = jailbreaks.record()
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / RESULT_FILE, result, overwrite=overwrite)
    return result


def _check_set_names(prompt_sets: Mapping[str, Any], qa_sets: Mapping[str, Any],
                     humaneval_sets: Mapping[str, Any]) -> None:
    """Refuse an evaluation with no set, or with a name used by two sets."""
    if not (prompt_sets or qa_sets or humaneval_sets):
        raise EnchtableError("nothing to evaluate: give at least one prompt set, question/answer set or HumanEval set")
    names = [*prompt_sets, *qa_sets, *humaneval_sets]
    if len(set(names)) != len(names):
        raise EnchtableError(f"set names must be unique across kinds, got {names}")


def _suffix_replay(suffixes: str | Path | Mapping[str, Any] | None,
                   prompt_sets: Mapping[str, Sequence[str]]) -> dict[str, str] | None:
    """{prompt: suffix} of `suffixes`, refused (before any work) when no safety prompt has a suffix there."""
    if suffixes is None:
        return None
    replay = suffix_map(suffixes)
    if not any(p in replay for prompts in prompt_sets.values() for p in prompts):
        where = suffixes if isinstance(suffixes, (str, Path)) else "the suffixes given"
        raise EnchtableError(f"--suffixes {where}: none of the safety prompts has a suffix there ({len(replay)} "
                             "attacked prompts); replay the attack's own prompt file")
    return replay


def _suffix_set(model: Any, tokenizer: Any, prompts: Sequence[str], replay: Mapping[str, str], judge: Judge,
                options: Mapping[str, Any]) -> dict[str, Any]:
    """One prompt set's answers with each prompt's suffix appended; prompts without a suffix are skipped (counted
    in `skipped`). The judge sees the plain prompt: it decides whether the request was carried out."""
    found = [p for p in prompts if p in replay]
    responses = generate(model, tokenizer, [with_suffix(p, replay[p]) for p in found], **options) if found else []
    verdicts = judge.judge(found, responses) if found else []
    return {"n": len(found), "skipped": len(prompts) - len(found), "unsafe": sum(verdicts),
            "unsafe_rate": unsafe_rate(verdicts) if found else None,
            "items": [{"prompt": p, "suffix": replay[p], "response": r, "unsafe": v}
                      for p, r, v in zip(found, responses, verdicts)]}


def _with_suffix_rows(rows: list[dict[str, Any]], safety: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The summary rows with a `SET +suffixes` row (the unsafe rate under the suffixes) after each safety set's
    last row, for the sets with at least one suffixed prompt."""
    for name, s in safety.items():
        replayed = s.get("suffixes")
        if replayed and replayed["n"]:
            at = max(i for i, r in enumerate(rows) if r["set"] == name) + 1
            rows.insert(at, {"set": f"{name} +suffixes", "metric": "unsafe_rate", "n": replayed["n"],
                             "value": replayed["unsafe_rate"]})
    return rows


def _check_defense(defense: str | None, expert: Any, safedecoding: SafeDecodingOptions | None) -> None:
    """Refuse an unknown defense, and an expert or SafeDecoding options without SafeDecoding (or it without them)."""
    if defense is not None and defense not in DEFENSES:
        raise EnchtableError(f"unknown defense {defense!r}; available: {', '.join(DEFENSES)}")
    if defense == "safedecoding" and expert is None:
        raise EnchtableError("defense safedecoding needs an expert: a safety expert model (or folder) with the "
                             "model's tokenizer")
    if defense != "safedecoding" and (expert is not None or safedecoding is not None):
        raise EnchtableError("an expert model and SafeDecoding options are read only with defense safedecoding")


def _defense(model: Any, tokenizer: Any, defense: str | None, expert: Any, safedecoding: SafeDecodingOptions | None,
             progress: bool | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(`generate` keywords applying the defense, its record for the settings); the expert is checked against the
    model's vocabulary before its weights are read."""
    if defense == "self-reminder":
        return {"reminder": SELF_REMINDER}, {"defense": defense, "self_reminder": dataclasses.asdict(SELF_REMINDER)}
    if defense == "safedecoding":
        safedecoding = safedecoding if safedecoding is not None else SafeDecodingOptions()
        check_expert(model, tokenizer, expert, safedecoding)
        if isinstance(expert, (str, Path)):
            expert = load(expert, progress=progress)
        return ({"expert": expert, "safedecoding": safedecoding},
                {"defense": defense, "expert": str(expert.source) if expert.source is not None else None,
                 "safedecoding": dataclasses.asdict(safedecoding)})
    return {}, {"defense": None}


def _safety_set(model: Any, tokenizer: Any, prompts: Sequence[str], judge: Judge,
                options: Mapping[str, Any]) -> dict[str, Any]:
    """One prompt set's answers and verdicts, and its unsafe rate."""
    responses = generate(model, tokenizer, prompts, **options)
    verdicts = judge.judge(prompts, responses)
    return {"n": len(prompts), "unsafe": sum(verdicts), "unsafe_rate": unsafe_rate(verdicts),
            "items": [{"prompt": p, "response": r, "unsafe": v} for p, r, v in zip(prompts, responses, verdicts)]}


def _jailbreak_set(model: Any, tokenizer: Any, prompts: Sequence[str], templates: Sequence[JailbreakTemplate],
                   judge: Judge, options: Mapping[str, Any]) -> dict[str, Any]:
    """One prompt set's answers with every prompt in every template, all in one `generate` call, scored by
    `jailbreaks.score`. The judge sees the plain prompt: it decides whether the request was carried out."""
    responses = generate(model, tokenizer, wrap(templates, prompts), **options)
    verdicts = judge.judge([p for _ in templates for p in prompts], responses)
    return score(templates, prompts, responses, verdicts)


def _qa_set(model: Any, tokenizer: Any, records: Sequence[Mapping[str, Any]],
            options: Mapping[str, Any]) -> dict[str, Any]:
    """One question/answer set's answers, each marked correct or not, and its exact-match score."""
    responses = generate(model, tokenizer, [str(r["question"]) for r in records], **options)
    correct = [answer_matches(resp, r["answer"]) for resp, r in zip(responses, records)]
    return {"metric": "exact_match", "n": len(records), "score": sum(correct) / len(records),
            "items": [{"question": r["question"], "answer": r["answer"], "response": resp, "correct": c}
                      for r, resp, c in zip(records, responses, correct)]}


def _humaneval_set(model: Any, tokenizer: Any, problems: Sequence[Mapping[str, str]], options: Mapping[str, Any],
                   timeout: float) -> dict[str, Any]:
    """One HumanEval set's answers, each run against its tests, and its pass@1."""
    asks = [HUMANEVAL_INSTRUCTION.format(prompt=p["prompt"]) for p in problems]
    responses = generate(model, tokenizer, asks, **options)
    scored = pass_at_1(problems, responses, timeout=timeout)
    return {"metric": "pass@1", "n": len(problems), "score": scored["score"], "isolation": scored["isolation"],
            "items": [{**res, "response": resp} for res, resp in zip(scored["results"], responses)]}


def _summary_rows(safety: Mapping[str, Any], utility: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per set: its name, metric, size and value; a set's jailbreak rows (with `template`) after its own."""
    rows = []
    for n, s in safety.items():
        rows.append({"set": n, "metric": "unsafe_rate", "n": s["n"], "value": s["unsafe_rate"]})
        if "jailbreaks" in s:
            rows += summary_rows(n, s["jailbreaks"])
    return rows + [{"set": n, "metric": u["metric"], "n": u["n"], "value": u["score"]} for n, u in utility.items()]


def _table_rows(summary: Sequence[Mapping[str, Any]], template_rows: int) -> list[tuple[str, str, str, str]]:
    """The table's cells: a template's row is named `set [template]`; of a set's template rows only the
    `template_rows` highest are shown, then how many more eval.json holds."""
    cells: list[tuple[str, str, str, str]] = []
    held: list[Mapping[str, Any]] = []

    def flush() -> None:
        for r in sorted(held, key=lambda r: -r["value"])[:template_rows]:
            name = r["template"] if len(r["template"]) <= 40 else r["template"][:39] + "…"
            cells.append((f"{r['set']} [{name}]", r["metric"], str(r["n"]), f"{r['value']:.3f}"))
        if len(held) > template_rows:
            cells.append((f"{held[0]['set']} [{len(held) - template_rows} more templates: eval.json]", "", "", ""))
        held.clear()

    for r in summary:
        if "template" in r:
            held.append(r)
            continue
        flush()
        cells.append((r["set"], r["metric"], str(r["n"]), f"{r['value']:.3f}"))
    flush()
    return cells


def summary_table(result: Mapping[str, Any], template_rows: int = TEMPLATE_ROWS) -> str:
    """A plain-text table of a result's summary rows: set, metric, n, value (per-template rows: the
    `template_rows` highest unsafe rates of each set)."""
    rows = [("set", "metric", "n", "value"), *_table_rows(result["summary"], template_rows)]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    defense = result["settings"].get("defense") or "none"
    return "\n".join(lines) + f"\njudge: {result['judge']}; defense: {defense}; {result['seconds']:.1f}s"
