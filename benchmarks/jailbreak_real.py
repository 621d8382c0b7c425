"""The issue-18 measurement recorded in BENCHMARKS.md ("Jailbreaks and defenses on the real aligned model"), on
the models an earlier real-model safety study left (Qwen2.5-Coder-0.5B aligned, its eroded task fine-tune;
calibrated EnchTable re-merged at its beta 0.4 into OUT/enchtable_calibrated beforehand): GCG on the task model,
then plain / static templates / transferred suffixes on the task model and calibrated EnchTable, and the task model
under Self-Reminder and SafeDecoding. `python benchmarks/jailbreak_real.py STAGE`, STAGE one of attack, eval-task,
eval-enchtable_calibrated, eval-task+self-reminder, eval-task+safedecoding; a finished stage is skipped. The study
(`--suite safety`) now runs the same stages itself; this script measured them on the study's existing models.
"""
import importlib.metadata
import json
import sys
import time
from pathlib import Path

import numpy as np

import enchtable_jax as ej
from enchtable_jax.bench.studies import safety_data as sd
from enchtable_jax.eval.defenses import SELF_REMINDER

S = Path("/work/cache/safety-mix/safety")
OUT = Path("/work/cache/jb")
N, STEPS, BATCH, TOPK, TEMPLATES, TOKENS = 20, 16, 16, 64, 6, 48
prompts = json.loads((S / "data/eval_advbench.json").read_text())[:N]
benign = json.loads((S / "data/eval_benign.json").read_text())
pyrit = Path(importlib.metadata.distribution("pyrit").locate_file("pyrit/datasets/jailbreak/templates"))
stage = sys.argv[1]
# 6 templates drawn with seed 0 from the 90 top-level (jailbreakchat-era) pyrit templates
top = sorted(pyrit.glob("*.yaml"))
picked = [top[i] for i in sorted(np.random.default_rng(0).choice(len(top), TEMPLATES, replace=False))]
templates = {t.name: t for f in picked for t in ej.eval.load_templates(f).templates}


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


if stage == "attack" and not (OUT / "attack-task/attack.json").exists():
    t = time.perf_counter()
    r = ej.gcg_attack(S / "models/task", None, prompts, steps=STEPS, batch=BATCH, topk=TOPK,
                      max_new_tokens=TOKENS, out=OUT / "attack-task", progress=False)
    log("attack", time.perf_counter() - t, "ASR", r["attack_success_rate"])
TEMPLATE_PROMPTS = 10  # the templates on the first 10 of the 20 attacked prompts (time: ~650-token prompts)
tset = ej.eval.TemplateSet(tuple(templates.values()), (), "pyrit 1.1.0, 6 of the 90 top-level templates (seed 0)")
for name, folder in {"task": S / "models/task", "enchtable_calibrated": OUT / "enchtable_calibrated"}.items():
    if stage != f"eval-{name}":
        continue
    model = ej.load(folder, progress=False)
    if not (OUT / f"eval-{name}/eval.json").exists():
        t = time.perf_counter()
        r = ej.evaluate(model, None, {"advbench": prompts, "benign": benign}, max_new_tokens=TOKENS, batch_size=64,
                        suffixes=OUT / "attack-task/attack.json", out=OUT / f"eval-{name}", progress=False)
        log(name, "plain+suffixes", time.perf_counter() - t)
        print(ej.eval.summary_table(r), flush=True)
    if not (OUT / f"eval-{name}-templates/eval.json").exists():
        t = time.perf_counter()
        r = ej.evaluate(model, None, {"advbench": prompts[:TEMPLATE_PROMPTS]}, max_new_tokens=TOKENS, batch_size=64,
                        jailbreak_templates=tset, out=OUT / f"eval-{name}-templates", progress=False)
        log(name, "templates", time.perf_counter() - t)
        print(ej.eval.summary_table(r), flush=True)

# The task model under each inference-time defense (SafeDecoding's expert: the aligned model), with utility.
for defense in ("self-reminder", "safedecoding"):
    name = f"task+{defense}"
    if stage != f"eval-{name}" or (OUT / f"eval-{name}/utility.json").exists():
        continue
    t = time.perf_counter()
    model = ej.load(S / "models/task", progress=False)
    kw, gen = {}, {}
    if defense == "self-reminder":
        kw, gen = {"defense": defense}, {"reminder": SELF_REMINDER}
    elif defense == "safedecoding":
        expert = ej.load("/work/cache/qwen-aligned", progress=False)
        kw, gen = {"defense": defense, "expert": expert}, {"expert": expert}
    r = ej.evaluate(model, None, {"advbench": prompts, "benign": benign}, max_new_tokens=TOKENS, batch_size=64,
                    suffixes=OUT / "attack-task/attack.json", out=OUT / f"eval-{name}", progress=False, **kw)
    print(ej.eval.summary_table(r))
    records = sd.read_jsonl(S / "data/task_eval.jsonl")
    responses = ej.generate(model, None, [r["question"] for r in records], max_new_tokens=128, batch_size=64,
                            progress=False, **gen)
    correct = sd.score_responses(records, responses, 0)
    (OUT / f"eval-{name}").mkdir(exist_ok=True)
    items = [{"question": r["question"], "response": x, "correct": c} for r, x, c in zip(records, responses, correct)]
    (OUT / f"eval-{name}/utility.json").write_text(
        json.dumps({"score": sum(correct) / len(correct), "n": len(correct), "items": items}, indent=1))
    log(name, time.perf_counter() - t, "utility", sum(correct) / len(correct))
