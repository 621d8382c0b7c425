"""Side-by-side timing: implementations alternate within one run, so machine noise hits them alike."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def alternate(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
              pause: float = 0.25) -> dict[str, list[float]]:
    """Seconds per call of each function; warm-up calls (compilation) are not counted.

    The order rotates every repeat, and each call starts after a `pause`, so that one library's
    worker threads still spinning after its call do not slow the next one down. Each function must
    block until its work is done (e.g. `jax.block_until_ready`).
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            time.sleep(pause)
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times


def summary(values: list[float]) -> dict[str, float]:
    """min / median / max of repeated measurements."""
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def ratio(numerator: list[float], denominator: list[float]) -> dict[str, float]:
    """Per-repeat ratios (paired by alternation order), summarised, and the ratio of the two medians.

    The paired ratios cancel noise that hits both sides of one repeat alike; `of_medians` is what a
    reader computes from the two recorded medians.
    """
    return {**summary([a / b for a, b in zip(numerator, denominator)]),
            "of_medians": statistics.median(numerator) / statistics.median(denominator)}


def rate(amount: float, seconds: list[float]) -> dict[str, float]:
    """`amount` per second (bytes, tokens, examples) for each repeat, summarised."""
    return summary([amount / s for s in seconds])
