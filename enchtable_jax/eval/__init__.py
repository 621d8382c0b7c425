"""Evaluation: generate answers in JAX, judge them, and measure unsafe rate and utility.

`evaluate` runs a whole evaluation (what `enchtable eval` calls); the pieces are usable on their own:
`generate` (batched, KV-cached, greedy or seeded sampling; the inference-time defenses Self-Reminder and
SafeDecoding: `SELF_REMINDER`, `safedecoding_scores`), the judges (`RefusalJudge`, `LLMJudge`,
`is_refusal`, `refusal_report`), `load_prompts`, the metrics (`unsafe_rate`, `exact_match`, `pass_at_1`), and the
static jailbreak templates (`load_templates`: PyRIT-format YAML/JSON, filled exactly), and attack.json's
suffixes (`read_attack`, `with_suffix`: what `enchtable attack` found, replayed as it was).
"""

from enchtable_jax.eval.defenses import DEFENSES, SELF_REMINDER, SelfReminder, check_expert, safedecoding_scores
from enchtable_jax.eval.generate import complete, eos_ids, generate, generate_ids
from enchtable_jax.eval.jailbreaks import JailbreakTemplate, TemplateSet, load_templates
from enchtable_jax.eval.judge import (
    RECIPES,
    Judge,
    LLMJudge,
    RefusalJudge,
    is_refusal,
    refusal_report,
)
from enchtable_jax.eval.metrics import exact_match, pass_at_1, unsafe_rate
from enchtable_jax.eval.pipeline import evaluate, summary_table
from enchtable_jax.eval.prompts import load_prompts, load_records
from enchtable_jax.eval.suffixes import read_attack, with_suffix

__all__ = ["DEFENSES", "JailbreakTemplate", "Judge", "LLMJudge", "RECIPES", "RefusalJudge", "SELF_REMINDER",
           "SelfReminder", "TemplateSet", "check_expert", "complete", "eos_ids", "evaluate", "exact_match",
           "generate", "generate_ids", "is_refusal", "load_prompts", "load_records", "load_templates", "pass_at_1",
           "read_attack", "refusal_report", "safedecoding_scores", "summary_table", "unsafe_rate", "with_suffix"]
