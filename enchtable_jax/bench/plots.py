"""PNG plots of study results (matplotlib Figure objects: no display and no pyplot backend needed)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path


def bars(title: str, seconds: Mapping[str, Mapping[str, float]], path: Path) -> Path:
    """Median seconds per implementation as horizontal bars, min–max as error bars (log axis for wide ranges);
    names sharing the part before a '/' share a colour."""
    from matplotlib.figure import Figure

    names = list(seconds)
    median = [seconds[n]["median"] for n in names]
    low = [seconds[n]["median"] - seconds[n]["min"] for n in names]
    high = [seconds[n]["max"] - seconds[n]["median"] for n in names]
    groups = list(dict.fromkeys(n.split("/")[0] for n in names))  # "ours/tiny", "torch/tiny": one colour per side
    colors = [f"C{groups.index(n.split('/')[0]) % 10}" for n in names]
    fig = Figure(figsize=(8, 0.9 + 0.42 * len(names)))
    ax = fig.subplots()
    ax.barh(range(len(names)), median, xerr=[low, high], color=colors, ecolor="black", capsize=3)
    ax.set_yticks(range(len(names)), labels=names)
    ax.invert_yaxis()
    if min(median) > 0 and max(median) / min(median) > 50:
        ax.set_xscale("log")
    ax.set(xlabel="seconds (median; bars: min to max over repeats)", title=title)
    ax.grid(axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def scale_curves(points: list[Mapping], kinds: tuple[str, ...], sweep_preset: str, path: Path) -> Path:
    """Median seconds vs parameter count (1 device) and vs device count (at `sweep_preset`), log-log, per kind."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2))
    by_size, by_devices = fig.subplots(1, 2)
    for kind in kinds:
        size = sorted((p for p in points if p["kind"] == kind and p["devices"] == 1), key=lambda p: p["parameters"])
        by_size.plot([p["parameters"] for p in size], [p["seconds"]["median"] for p in size], "o-", label=kind)
        sweep = sorted((p for p in points if p["kind"] == kind and p["preset"] == sweep_preset),
                       key=lambda p: p["devices"])
        by_devices.plot([p["devices"] for p in sweep], [p["seconds"]["median"] for p in sweep], "o-", label=kind)
    by_size.set(xscale="log", yscale="log", xlabel="parameters", ylabel="median seconds (1 device)",
                title="growth with model size")
    counts = sorted({p["devices"] for p in points})
    by_devices.set(xscale="log", yscale="log", xlabel="devices", ylabel="median seconds",
                   title=f"growth with device count ({sweep_preset})")
    by_devices.set_xticks(counts, labels=[str(c) for c in counts])
    by_devices.minorticks_off()
    for ax in (by_size, by_devices):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
