"""The demo's plot: every model is named once, in a legend, and no two pieces of text overlap."""

from __future__ import annotations

import itertools

import matplotlib.pyplot as plt

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
    fig = results_figure(rows)
    fig.canvas.draw()
    texts = _texts(fig)
    names = [text for text, _ in texts if text in {r["name"] for r in rows}]
    assert sorted(names) == sorted(r["name"] for r in rows)  # each model named exactly once
    overlaps = [(a, b) for (a, box_a), (b, box_b) in itertools.combinations(texts, 2) if box_a.overlaps(box_b)]
    assert not overlaps, overlaps
    width, height = fig.canvas.get_width_height()
    for text, box in texts:  # nothing cut off at the figure's edges
        assert box.x0 >= 0 and box.y0 >= 0 and box.x1 <= width and box.y1 <= height, text
    plt.close(fig)
