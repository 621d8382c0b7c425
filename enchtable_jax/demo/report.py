"""The demo's outputs for people: a text table and a plot of unsafe rate against utility."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

REFERENCE_MODELS = ("base", "aligned", "task")


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Model / method, unsafe rate, utility, skill and harmless-refusal rate, in percent."""
    header = f"{'model / method':<18}{'unsafe rate':>12}{'utility':>10}{'skill':>8}{'over-refusal':>14}"
    lines = [header, "-" * len(header)]
    for i, row in enumerate(rows):
        lines.append(f"{row['name']:<18}{row['unsafe_rate']:>12.0%}{row['utility']:>10.0%}{row['skill']:>8.0%}"
                     f"{row['harmless_refusal']:>14.0%}")
        if row["name"] in REFERENCE_MODELS and i + 1 < len(rows) and rows[i + 1]["name"] not in REFERENCE_MODELS:
            lines.append("-" * len(header))  # the merges follow
    return "\n".join(lines)


def plot_results(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Unsafe rate (x) against utility (y): one point per model and merge method; lower right is better."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for row in rows:
        reference = row["name"] in REFERENCE_MODELS
        ax.scatter(100 * row["unsafe_rate"], 100 * row["utility"], marker="s" if reference else "o",
                   color="grey" if reference else ("tab:red" if row["name"] == "enchtable" else "tab:blue"), zorder=3)
        ax.annotate(row["name"], (100 * row["unsafe_rate"], 100 * row["utility"]), textcoords="offset points",
                    xytext=(5, 4), fontsize=8)
    ax.set(xlabel="unsafe rate on held-out harmful prompts (%)", ylabel="utility: held-out task exact match (%)",
           title="EnchTable demo: safety transfer into the fine-tuned model", xlim=(-5, 105), ylim=(-5, 105))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
