"""`merge_report.json` and the weight / interference plot of a merge."""

from __future__ import annotations

import io
import json
import math
import re
import resource
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

from enchtable_jax.merging.executor import MergePlan
from enchtable_jax.merging.methods import METHODS

_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)\.weight$")
_MARGINS = {"left": 0.06, "right": 0.99, "bottom": 0.13, "top": 0.92, "wspace": 0.17}  # of the 11 × 3.8 in figure


def peak_rss_bytes() -> int:
    """This process's peak resident set size: VmHWM, since Linux's ru_maxrss carries a parent's peak over
    fork and exec (a merge started from a large notebook would report the notebook's size)."""
    try:
        with open("/proc/self/status") as f:
            return 1024 * next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return (1 if sys.platform == "darwin" else 1024) * resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def report_dict(plan: MergePlan, stats: Mapping[str, Mapping[str, float]], method: str, options: dict[str, Any],
                summary: dict[str, Any]) -> dict[str, Any]:
    """Everything about a merge: settings, α and norms, and per tensor what happened and why (with the method's
    `stats` of each merged tensor, as pass 2 yielded them)."""
    alpha = plan.alpha if METHODS[method].uses_alpha else None  # None: the method's formula has no α
    tensors = []
    for t in plan.tensors.values():
        entry: dict[str, Any] = {"name": t.name, "shape": list(t.shape), "dtype": t.dtype.name,
                                 "merged": t.merge, "skipped": t.reason}
        if t.merge:
            entry.update({"method": method, "alpha": alpha,
                          **{k: (None if math.isnan(v) else v) for k, v in stats[t.name].items()}})
        tensors.append(entry)
    return {"method": method, "options": options, "alpha": alpha, "norms": plan.norms,
            "merged": sum(t.merge for t in plan.tensors.values()),
            "skipped": sum(not t.merge for t in plan.tensors.values()), **summary, "tensors": tensors}


def alpha_text(report: dict[str, Any], digits: int = 4) -> str:
    """'α = 0.125', or 'no α' for a method whose formula has none (the report's alpha is None)."""
    return "no α" if report["alpha"] is None else f"α = {report['alpha']:.{digits}g}"


def report_files(report: dict[str, Any], png: bytes | None = None) -> dict[str, str | bytes]:
    """merge_report.json and merge_report.png, by name, for the output folder (`png`: the plot, when drawn
    already)."""
    return {"merge_report.json": json.dumps(report, indent=2) + "\n",
            "merge_report.png": plot_png(report) if png is None else png}


def plot_png(report: dict[str, Any]) -> bytes:
    """The report's plot (`plot`) as PNG bytes."""
    png = io.BytesIO()
    plot(report, png)
    return png.getvalue()


def plot(report: dict[str, Any], path: Path | BinaryIO) -> None:
    """Safety weight and interference of every merged matrix, by layer, one line per module (a PNG file or
    buffer)."""
    from matplotlib.figure import Figure

    series: dict[str, dict[str, list]] = {}
    for t in report["tensors"]:
        m = _LAYER.match(t["name"])
        if not (t["merged"] and m):
            continue
        s = series.setdefault(m.group(2), {"layer": [], "weight": [], "interference": []})
        s["layer"].append(int(m.group(1)))
        s["weight"].append(t.get("weight"))
        s["interference"].append(t.get("interference"))
    fig = Figure(figsize=(11, 3.8))
    axes = fig.subplots(1, 2)
    for ax, key in zip(axes, ("weight", "interference")):
        for module, s in sorted(series.items()):
            points = sorted((x, y) for x, y in zip(s["layer"], s[key]) if y is not None)  # names sort 10 before 2
            if points:
                ax.plot(*zip(*points), marker="o", ms=3, label=module.replace("self_attn.", "").replace("mlp.", ""))
        ax.set(xlabel="layer", ylabel=key, title=f"{report['method']}: {key} ({alpha_text(report, 3)})")
        ax.grid(alpha=0.3)
    if axes[0].get_lines():
        axes[0].legend(fontsize=7, ncol=2)
    else:
        why = "this method has no per-matrix weight" if series else "no per-layer matrices merged"
        axes[0].text(0.5, 0.5, why, ha="center", transform=axes[0].transAxes)
    fig.subplots_adjust(**_MARGINS)  # fixed: tight_layout measured every label again, a third of the plot's time
    fig.savefig(path, dpi=100)
