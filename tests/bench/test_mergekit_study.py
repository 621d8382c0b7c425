"""The mergekit study: its headline is the slowest method per repeat, and (slow) each side runs in a process of its
own, at the size asked for, with a failure in a child raised here."""

from __future__ import annotations

import pytest

from enchtable_jax.bench.optional import optional_module
from enchtable_jax.bench.process import Worker
from enchtable_jax.bench.studies import mergekit
from enchtable_jax.bench.timing import ratio


def test_slowest_is_the_smallest_speedup_of_each_repeat():
    theirs = {"a": [2.0, 3.0, 4.0], "b": [1.0, 9.0, 1.0]}
    ours = {"a": [1.0, 1.0, 1.0], "b": [1.0, 1.0, 2.0]}
    per_repeat = {m: [t / o for t, o in zip(theirs[m], ours[m])] for m in theirs}  # a: 2, 3, 4; b: 1, 9, 0.5
    speedup = {m: ratio(theirs[m], ours[m]) for m in theirs}
    got = mergekit.slowest(per_repeat, speedup)
    assert got == {"min": 0.5, "median": 1.0, "max": 3.0, "of_medians": min(3.0, 1.0)}


@pytest.mark.slow
def test_tiny_study_runs_each_side_in_its_own_process(tmp_path):
    if optional_module("mergekit.merge")[0] is None:
        pytest.skip("mergekit is not installed")
    got = mergekit.run(size="tiny", repeats=1)
    assert got["preset"] == "tiny" and set(got["speedup_vs_mergekit"]) == set(mergekit.METHODS)
    assert got["slowest_speedup_vs_mergekit"]["median"] == min(s["median"]
                                                               for s in got["speedup_vs_mergekit"].values())
    assert max(got["max_abs_difference"].values()) < 1e-6
    worker = Worker("ours", mergekit._sides, "ours", {r: tmp_path / r for r in ("base", "task", "safe")},
                    {m: tmp_path / m for m in mergekit.METHODS})
    with pytest.raises(RuntimeError, match="the ours side failed in its process"):
        worker.runner("ties")()
    worker.close()
