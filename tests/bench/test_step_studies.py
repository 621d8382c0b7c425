"""The linearize and distill studies: `--size NAME` reaches the preset they build, and the distill study reports
its step over the linearize study's step as a paired ratio of its own samples."""

from __future__ import annotations

import statistics

import pytest

from enchtable_jax.bench.studies import distill, linearize
from enchtable_jax.models.init import PRESETS


class Built(Exception):
    """Raised by the stand-in preset_config: the study asked for this preset."""


@pytest.mark.parametrize("study", [linearize, distill])
def test_size_chooses_the_preset(study, monkeypatch):
    def preset_config(name, *args, **kwargs):
        raise Built(name)

    monkeypatch.setattr(study, "preset_config", preset_config)
    assert set(study.SIZES) <= set(PRESETS)
    for size in study.SIZES:
        with pytest.raises(Built, match=f"^{size}$"):
            study.run(size=size)
    with pytest.raises(Built, match="^tiny$"):
        study.run(quick=True)


@pytest.mark.slow
def test_distill_study_pairs_each_distill_step_with_a_linearize_step():
    figures = distill.run(quick=True, repeats=3)
    samples = figures["samples"]
    assert figures["repeats"] == len(samples["distill_step"]) == len(samples["linearize_step"]) == 3
    ratios = [d / s for d, s in zip(samples["distill_step"], samples["linearize_step"])]
    assert figures["distill_step_over_linearize_step"] == {
        "min": min(ratios), "median": statistics.median(ratios), "max": max(ratios),
        "of_medians": statistics.median(samples["distill_step"]) / statistics.median(samples["linearize_step"])}
    assert figures["batch"] == [4, 144] and figures["linearize_batch"] == [4, 142]  # 142-token records, 1/8 padding
