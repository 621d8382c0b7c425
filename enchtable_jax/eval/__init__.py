"""Evaluation: generate answers in JAX, judge them, and measure unsafe rate and utility."""

from enchtable_jax.eval.generate import eos_ids, generate, generate_ids
from enchtable_jax.eval.judge import (
    RECIPES,
    Judge,
    LLMJudge,
    RefusalJudge,
    is_refusal,
    refusal_report,
)

__all__ = ["RECIPES", "Judge", "LLMJudge", "RefusalJudge", "eos_ids", "generate", "generate_ids", "is_refusal",
           "refusal_report"]
