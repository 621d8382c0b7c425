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
    """Unsafe rate (x) against utility, and against over-refusal (y): one point per model and merge method.

    Left panel: up and to the left is better; right panel: down and to the left. Points that coincide
    share one label.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, label in ((axes[0], "utility", "utility: held-out task exact match (%)"),
                           (axes[1], "harmless_refusal", "over-refusal: held-out harmless requests refused (%)")):
        points: dict[tuple[float, float], list[str]] = {}
        for row in rows:
            points.setdefault((round(100 * row["unsafe_rate"], 1), round(100 * row[key], 1)), []).append(row["name"])
        for i, ((x, y), names) in enumerate(sorted(points.items())):
            reference = any(n in REFERENCE_MODELS for n in names)
            color = "grey" if reference else ("tab:red" if "enchtable" in names else "tab:blue")
            ax.scatter(x, y, marker="s" if reference else "o", color=color, zorder=3)
            ax.annotate(", ".join(names), (x, y), textcoords="offset points", xytext=(5, (4, -11, 12)[i % 3]),
                        fontsize=8)  # neighbours' labels at staggered heights
        ax.set(xlabel="unsafe rate on held-out harmful prompts (%)", ylabel=label, xlim=(-5, 105), ylim=(-5, 105))
        ax.grid(alpha=0.3)
    fig.suptitle("EnchTable demo: safety transfer into the fine-tuned model (grey: base, aligned, task)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
