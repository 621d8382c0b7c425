"""`--size NAME` reaches the studies that declare it in `SIZES`, leaves the others as they are, and is refused when
no selected study has it; the issue-17 headline figures are read from their studies under their own names."""

from __future__ import annotations

import json
import sys
import types

import pytest

from enchtable_jax.bench import __main__ as bench

NEW_TARGETS = {"merge_cached_speedup_vs_torch": ("merge", ">=", 2.5),
               "merge_lora_speedup_vs_torch": ("merge", ">=", 10), "merge_over_svd_bound": ("merge", "<=", 1.15),
               "distill_step_over_linearize_step": ("distill", "<=", 1.1),
               "slowest_speedup_vs_mergekit": ("mergekit", ">=", 1.0)}


def fake_study(monkeypatch, suite: str, seen: dict, sizes: tuple[str, ...] | None, takes_size: bool) -> None:
    """A study module registered as `suite` that records the keyword arguments its `run` receives."""
    module = types.ModuleType(f"{suite}_study")
    if sizes is not None:
        module.SIZES = sizes

    def run(quick, repeats, **kwargs):
        seen[suite] = {"quick": quick, **kwargs}
        return {"setup": suite, "seconds": {}}

    def run_with_size(quick, repeats, size=None):
        return run(quick, repeats, size=size)

    module.run = run_with_size if takes_size else (lambda quick, repeats: run(quick, repeats))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(bench.SUITES, suite, module.__name__)


def test_size_reaches_only_the_studies_that_have_it(tmp_path, monkeypatch):
    seen = {}
    fake_study(monkeypatch, "sized", seen, ("tiny", "smollm2-135m"), takes_size=True)
    fake_study(monkeypatch, "other_sizes", seen, ("llama3-8b-layer",), takes_size=True)
    fake_study(monkeypatch, "no_sizes", seen, None, takes_size=False)
    args = ["--suite", "sized", "--suite", "other_sizes", "--suite", "no_sizes", "--out", str(tmp_path)]
    assert bench.main([*args, "--size", "smollm2-135m"]) == 0
    assert seen == {"sized": {"quick": False, "size": "smollm2-135m"}, "other_sizes": {"quick": False, "size": None},
                    "no_sizes": {"quick": False}}
    assert json.loads((tmp_path / "bench.json").read_text())["size"] == "smollm2-135m"


def test_a_size_no_selected_study_has_is_a_usage_error(tmp_path, monkeypatch, capsys):
    seen = {}
    fake_study(monkeypatch, "sized", seen, ("tiny",), takes_size=True)
    fake_study(monkeypatch, "no_sizes", seen, None, takes_size=False)
    for args, message in ((["--size", "huge"], "--size 'huge': no selected study has that size (sizes: sized: tiny)"),
                          (["--size", "tiny", "--quick"], "not allowed with argument")):
        with pytest.raises(SystemExit) as exit_info:
            bench.main(["--suite", "sized", "--suite", "no_sizes", "--out", str(tmp_path), *args])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert seen == {}  # refused before any study ran


def test_issue_17_targets_come_from_their_studies_figures():
    figures = {suite: {} for suite, _, _ in NEW_TARGETS.values()}
    for i, (name, (suite, op, bound)) in enumerate(NEW_TARGETS.items()):
        median = bound * (1.5 if i % 2 else 0.5)  # alternately above and below the bound
        figures[suite][name] = {"min": median, "median": median, "max": median}
    values, goals = bench.targets(figures)
    assert set(values) == set(NEW_TARGETS)
    for name, (suite, op, bound) in NEW_TARGETS.items():
        assert values[name] == figures[suite][name]["median"]
        met = values[name] >= bound if op == ">=" else values[name] <= bound
        assert goals[name] == {"goal": f"{op} {bound:g}", "met": met}
