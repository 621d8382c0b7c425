"""The demo's outputs for people: a text table and a plot of unsafe rate against utility."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

REFERENCE_MODELS = ("base", "aligned", "task")
REFERENCE_MARKERS = {"base": "X", "aligned": "s", "task": "D"}


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


def results_figure(rows: Sequence[dict[str, Any]]):
    """Unsafe rate (x) against utility, and against over-refusal (y): one marker per model and merge method.

    Left panel: up and to the left is better; right panel: down and to the left. Models are told apart
    by marker and colour in one legend beside the panels, never by text next to a point, so labels stay
    readable however close the points fall (several methods often land on the same spot).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    baselines = iter(plt.get_cmap("tab10").colors)
    styles = {}
    for row in rows:
        name = row["name"]
        if name in REFERENCE_MODELS:
            styles[name] = dict(marker=REFERENCE_MARKERS[name], color="dimgrey", s=60)
        elif name.startswith("enchtable"):
            styles[name] = dict(marker="*", color="tab:red" if name == "enchtable" else "darkred", s=160)
        else:
            styles[name] = dict(marker="o", color=next(baselines), s=45)
    for ax, key, label in ((axes[0], "utility", "utility: held-out task exact match (%)"),
                           (axes[1], "harmless_refusal", "over-refusal: held-out harmless requests refused (%)")):
        for row in rows:
            ax.scatter(100 * row["unsafe_rate"], 100 * row[key], label=row["name"], zorder=3, alpha=0.85,
                       edgecolors="white", linewidths=0.5, **styles[row["name"]])
        ax.set(xlabel="unsafe rate on held-out harmful prompts (%)", ylabel=label, xlim=(-5, 105), ylim=(-5, 105))
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(0.84, 0.5), fontsize=9, frameon=False)
    fig.suptitle("EnchTable demo: safety transfer into the fine-tuned model")
    fig.tight_layout(rect=(0, 0, 0.84, 1))
    return fig


def plot_results(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """`results_figure` written as a PNG at `path`."""
    import matplotlib.pyplot as plt

    fig = results_figure(rows)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
