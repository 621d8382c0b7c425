"""The demo's plot: every model is named once, in a legend, and no two pieces of text overlap."""

from __future__ import annotations

import itertools

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from enchtable_jax.demo.report import results_figure

# the table of the README's seed-0 run, where several methods land on (nearly) the same point
ROWS = [(n, u, t, r) for n, u, t, r in [
    ("base", 1.0, .06, 0), ("aligned", .15, .05, 0), ("task", .55, .98, 0), ("enchtable", .10, .97, 0),
    ("task_arithmetic", .05, .97, .40), ("ties", .125, .92, 0), ("dare", .05, .97, .40),
    ("breadcrumbs", .05, .95, .425), ("model_stock", .15, .61, .025), ("tsv", .10, .91, .15),
    ("safelora", .20, .625, .025), ("enchtable_calibrated", .10, .97, 0)]]


def _drawn_tick_labels(ax):
    """Tick labels inside the view limits (matplotlib keeps, but does not draw, the others)."""
    for axis, (low, high) in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
        for tick in axis.get_major_ticks():
            if low <= tick.get_loc() <= high:
                yield tick.label1


def _texts(fig):
    """(text, box in pixels) of everything written on the figure: titles, axis and tick labels, legend,
    annotations."""
    renderer = fig.canvas.get_renderer()
    texts = [*fig.texts, *(t for legend in fig.legends for t in legend.get_texts())]
    for ax in fig.axes:
        texts += [ax.title, ax.xaxis.label, ax.yaxis.label, *ax.texts, *_drawn_tick_labels(ax)]
        if ax.get_legend():
            texts += ax.get_legend().get_texts()
    return [(t.get_text(), t.get_window_extent(renderer)) for t in texts if t.get_visible() and t.get_text().strip()]


def test_every_label_is_readable():
    rows = [{"name": n, "unsafe_rate": u, "utility": t, "skill": 0.5, "harmless_refusal": r} for n, u, t, r in ROWS]
    fig = results_figure([rows])
    FigureCanvasAgg(fig).draw()  # the figure has no backend of its own: measure text with Agg's renderer
    texts = _texts(fig)
    names = [text for text, _ in texts if text in {r["name"] for r in rows}]
    assert sorted(names) == sorted(r["name"] for r in rows)  # each model named exactly once
    overlaps = [(a, b) for (a, box_a), (b, box_b) in itertools.combinations(texts, 2) if box_a.overlaps(box_b)]
    assert not overlaps, overlaps
    width, height = fig.canvas.get_width_height()
    for text, box in texts:  # nothing cut off at the figure's edges
        assert box.x0 >= 0 and box.y0 >= 0 and box.x1 <= width and box.y1 <= height, text


def test_several_seeds_keep_one_legend_entry_per_model_and_readable_labels():
    rows = [{"name": n, "unsafe_rate": u, "utility": t, "skill": 0.5, "harmless_refusal": r} for n, u, t, r in ROWS]
    shifted = [{**row, "unsafe_rate": min(1.0, row["unsafe_rate"] + 0.1)} for row in rows]
    fig = results_figure([rows, shifted, rows])
    FigureCanvasAgg(fig).draw()
    texts = _texts(fig)
    assert sorted(t for t, _ in texts if t in {r["name"] for r in rows}) == sorted(r["name"] for r in rows)
    assert not [(a, b) for (a, box_a), (b, box_b) in itertools.combinations(texts, 2) if box_a.overlaps(box_b)]


def test_summary_over_seeds():
    from enchtable_jax.demo.report import summarize

    a = [{"name": "x", "unsafe_rate": 0.2, "utility": 1.0, "skill": 0.5, "harmless_refusal": 0.0, "beta": 0.1}]
    b = [{"name": "x", "unsafe_rate": 0.4, "utility": 0.5, "skill": 0.5, "harmless_refusal": 0.1, "beta": 0.3}]
    s = summarize([a, b])["x"]
    assert s["unsafe_rate"] == pytest.approx({"mean": 0.3, "std": 0.1, "min": 0.2, "max": 0.4})
    assert s["beta"]["mean"] == 0.2 and s["utility"]["std"] == 0.25


def _row(name, unsafe, utility, refusal):
    return {"name": name, "unsafe_rate": unsafe, "utility": utility, "skill": 0.5, "harmless_refusal": refusal}


def test_acceptance_checks_means_and_the_frontier_on_every_seed():
    from enchtable_jax.demo.report import acceptance, dominated_by

    seed_a = [_row("aligned", 0.1, 0.0, 0.05), _row("task", 0.9, 1.0, 0.0), _row("enchtable", 0.6, 1.0, 0.0),
              _row("ties", 0.9, 1.0, 0.0), _row("task_arithmetic", 0.1, 1.0, 0.5),
              _row("enchtable_calibrated", 0.2, 0.95, 0.1)]
    seed_b = [{**r} for r in seed_a]
    result = acceptance([seed_a, seed_b])
    assert result["met"] and result["dominated_by"] == {}
    # a baseline safer and no more refusing: no longer on the frontier (on that seed only)
    seed_b.append(_row("tsv", 0.15, 1.0, 0.1))
    result = acceptance([seed_a, seed_b])
    assert not result["met"] and result["dominated_by"] == {1: ["tsv"]}
    assert dominated_by(seed_b, "enchtable_calibrated") == ["tsv"]
    # means: 0.2 + 0.31 over two seeds is 0.255 > aligned 0.1 + 0.1
    seed_c = [r if r["name"] != "enchtable_calibrated" else {**r, "unsafe_rate": 0.31} for r in seed_a]
    result = acceptance([seed_a, seed_c])
    assert not result["unsafe_within_10_points_of_aligned"] and result["over_refusal_within_10_points_of_aligned"]
    seed_d = [r if r["name"] != "enchtable_calibrated" else {**r, "utility": 0.8} for r in seed_a]
    assert not acceptance([seed_a, seed_d])["utility_at_least_90_percent_of_task"]  # 0.875 < 0.9


def test_table_shows_the_jailbreak_columns_and_sets_the_defenses_apart():
    """The demo's table: a column per score present (a missing GCG figure as '-'), the rules after the reference
    models and before the defenses; the defenses are not merge baselines, so they never dominate EnchTable."""
    from enchtable_jax.demo.report import dominated_by, format_table

    jail = {"template_unsafe_rate": 0.625, "template_asr": 1.0, "gcg_unsafe_rate": 0.5}
    rows = [{**_row("task", 0.71, 0.36, 0.0), **jail}, {**_row("enchtable_calibrated", 0.24, 0.38, 0.06), **jail,
                                                         "beta": 0.5},
            {**_row("task+self_reminder", 0.0, 0.05, 0.0), **jail, "gcg_unsafe_rate": None},
            {**_row("task+safedecoding", 0.04, 0.0, 0.0), **jail}]
    lines = format_table(rows).splitlines()
    assert lines[0].split() == ["model", "/", "method", "unsafe", "templates", "tmpl", "ASR", "GCG", "utility",
                                "skill", "over-refusal"]
    assert [line.split() for line in lines[2:] if not line.startswith("-")] == [
        ["task", "71%", "62%", "100%", "50%", "36%", "50%", "0%"],
        ["enchtable_calibrated", "24%", "62%", "100%", "50%", "38%", "50%", "6%", "(β", "=", "0.5)"],
        ["task+self_reminder", "0%", "62%", "100%", "-", "5%", "50%", "0%"],
        ["task+safedecoding", "4%", "62%", "100%", "50%", "0%", "50%", "0%"]]
    assert [i for i, line in enumerate(lines) if set(line) == {"-"}] == [1, 3, 5]
    assert len({len(line) for line in lines[:2]}) == 1  # the rule is as wide as the header
    assert dominated_by(rows, "enchtable_calibrated") == []
