"""`python -m enchtable_jax.bench`: the entry point writes bench.json, PNG plots and bench.md whose figures
are consistent with the recorded samples; optional libraries are reported, not fatal.

The end-to-end test runs the CLI in a fresh process (as after a plain install) with `--quick` on a subset
of suites, convert, linearize and ntk, so that it stays well under a minute on a 2-core machine; the
full `--quick` run (all seven suites, ~2-3 minutes there) is recorded in
benchmarks/results/quick-cpu-2core. The other suites' mechanisms are tested below on their own: the
scale study's fresh processes with a chosen device count and its growth arithmetic, the mergekit
study's configurations, a failing study.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import types

import matplotlib.image
import pytest

from enchtable_jax.bench import __main__ as bench
from enchtable_jax.bench.optional import BENCHMARKS_ENV, optional_module, reference_module
from enchtable_jax.bench.process import cpu_devices_env, run_fresh
from enchtable_jax.bench.studies import scale
from enchtable_jax.kernels.ntk import neural_tangents_module

SUITES = ("convert", "linearize", "ntk")
# ratio figure -> (numerator, denominator) implementations, per suite
RATIOS = {
    "convert": {"convert_fraction_of_floor": ("safetensors_load", "ours_load"),
                "convert_write_fraction_of_floor": ("safetensors_save", "ours_save")},
    "linearize": {"linearized_over_plain": ("jax_linearized", "jax_plain"),
                  "linearized_speedup_vs_torch": ("torch_linearized", "jax_linearized")},
    "ntk": {"ntvp_over_jacobian": ("ntvp", "jacobian")},
}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _assert_png(path):
    assert path.read_bytes()[:8] == PNG_MAGIC, path
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100, (path, image.shape)
    assert image[..., :3].std() > 0.01  # not a blank canvas


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the CPU devices a fresh install has
    cmd = [sys.executable, "-m", "enchtable_jax.bench", "--quick", *(a for s in SUITES for a in ("--suite", s)),
           "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    return out, json.loads((out / "bench.json").read_text()), done.stdout


def test_quick_run_writes_three_outputs(quick_run):
    out, results, stdout = quick_run
    assert sorted(p.name for p in out.iterdir()) == sorted(["bench.json", "bench.md", *(f"{s}.png" for s in SUITES)])
    for suite in SUITES:
        _assert_png(out / f"{suite}.png")
        assert results["plots"][suite] == [f"{suite}.png"]
    assert results["quick"] is True and list(results["suites"]) == list(SUITES)
    assert results["command"].endswith(f"--out {out}")
    machine = results["machine"]
    cores = len(os.sched_getaffinity(0))  # `import enchtable_jax` gives JAX one CPU device per core
    assert machine["cpu_count"] >= 1 and machine["devices"] == [f"cpu:{i}" for i in range(cores)]
    assert machine["backend"] == "cpu"
    assert {"jax", "jaxlib", "numpy", "enchtable-jax"} <= set(machine["versions"])
    assert all(results["wall_seconds"][s] > 0 and len(results["load_average"][s]["before"]) == 3 for s in SUITES)
    assert "bench.md" in stdout


def test_figures_are_consistent_with_samples(quick_run):
    _, results, _ = quick_run
    for suite in SUITES:
        figures = results["suites"][suite]
        assert "error" not in figures
        assert set(figures["seconds"]) == set(figures["samples"])
        for name, t in figures["seconds"].items():
            samples = figures["samples"][name]
            assert len(samples) == figures["repeats"] and all(s > 0 for s in samples)
            assert t == {"min": min(samples), "median": statistics.median(samples), "max": max(samples)}
        for key, (num, den) in RATIOS[suite].items():
            a, b = figures["samples"][num], figures["samples"][den]
            r = figures[key]
            assert r["of_medians"] == pytest.approx(figures["seconds"][num]["median"] / figures["seconds"][den]["median"])
            assert r["median"] == pytest.approx(statistics.median([x / y for x, y in zip(a, b)]))
            assert r["min"] <= r["median"] <= r["max"]


def test_throughput_and_study_specific_figures(quick_run):
    _, results, _ = quick_run
    convert = results["suites"]["convert"]
    assert convert["preset"] == "tiny" and convert["bytes"] > 100_000 and convert["files"] == 1
    for name, samples in convert["samples"].items():
        mbps = sorted(convert["bytes"] / 1e6 / s for s in samples)
        assert convert["megabytes_per_second"][name]["median"] == pytest.approx(statistics.median(mbps))
    for impl, cold in convert["cold"].items():  # fresh processes: the peak covers at least the model's bytes
        assert cold["peak_rss_bytes"] >= cold["rss_after_import_bytes"] > 10 * 2**20, impl
    linearize = results["suites"]["linearize"]
    tokens = linearize["batch"][0] * linearize["batch"][1]
    assert linearize["tokens_per_second"]["jax_plain"]["max"] == pytest.approx(
        tokens / linearize["seconds"]["jax_plain"]["min"])
    ntk = results["suites"]["ntk"]
    assert ntk["max_relative_difference"]["ntvp"] < 1e-4  # both implementations computed the same kernel
    try:
        neural_tangents_module()
    except ImportError:
        assert "neural-tangents is unavailable" in ntk["unavailable"]["neural_tangents"]
        assert "neural_tangents" not in ntk["seconds"]
    else:  # its speed is reported beside ours, for the same kernel
        assert ntk["max_relative_difference"]["neural_tangents"] < 1e-5
        assert ntk["examples_per_second"]["neural_tangents"]["median"] > 0
        assert "neural_tangents_over_jacobian" in ntk


def test_targets_and_markdown(quick_run):
    out, results, _ = quick_run
    expected = {"convert_fraction_of_floor": ("convert", ">=", 0.5),
                "linearized_over_plain": ("linearize", "<=", 1.6),
                "linearized_speedup_vs_torch": ("linearize", ">=", 1.0)}
    assert set(results["targets"]) == set(expected)  # merge's targets only when the merge study ran
    md = (out / "bench.md").read_text()
    for name, (suite, op, bound) in expected.items():
        value = results["targets"][name]
        assert value == results["suites"][suite][name]["median"]
        met = value >= bound if op == ">=" else value <= bound
        assert results["target_goals"][name] == {"goal": f"{op} {bound:g}", "met": met}
        assert f"| {name} | {value:.3f} | {op} {bound:g} | {'yes' if met else 'no'} |" in md
    for suite in SUITES:
        assert f"### {suite} (" in md
        for name, t in results["suites"][suite]["seconds"].items():
            assert f"| {name} | {t['median']:.4g} | {t['min']:.4g} | {t['max']:.4g} |" in md


def test_torch_missing_is_reported(monkeypatch):
    # transformers' config classes (read for HF defaults) import torch when it is installed; without torch they
    # import without it (.ci/smoke proves it on a plain install). Hidden below, torch is still "installed" to
    # transformers, so the classes are imported first, as a torch-less install would have them.
    import transformers

    transformers.LlamaConfig, transformers.MistralConfig, transformers.Qwen2Config
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails as if it were not installed
    monkeypatch.delitem(sys.modules, "enchtable_benchmarks.torch_reference", raising=False)
    module, why = reference_module("torch_reference")
    assert module is None and why.startswith("torch unavailable (")
    assert why.endswith("pip install 'enchtable-jax[bench]')")  # names the extra that brings it
    assert "enchtable_benchmarks.torch_reference" not in sys.modules
    from enchtable_jax.bench.studies import linearize

    figures = linearize.run(quick=True, repeats=1)
    assert figures["unavailable"] == {"torch_linearized": why}
    assert set(figures["seconds"]) == {"jax_linearized", "jax_plain"} and "linearized_speedup_vs_torch" not in figures
    assert "- torch_linearized: torch unavailable (" in "\n".join(bench.suite_markdown("linearize", figures))


def test_references_missing_from_an_install_are_reported(monkeypatch, tmp_path):
    """A wheel install has no benchmarks/ folder: the reference is reported missing, naming where it was looked for."""
    monkeypatch.setenv(BENCHMARKS_ENV, str(tmp_path / "nowhere"))
    monkeypatch.delitem(sys.modules, "enchtable_benchmarks.torch_merge", raising=False)
    module, why = reference_module("torch_merge")
    assert module is None and str(tmp_path / "nowhere" / "torch_merge.py") in why and BENCHMARKS_ENV in why


@pytest.mark.slow  # 13 s: the whole quick merge study; .ci/smoke runs it on the plain install, without torch
def test_merge_study_measures_ours_alone_without_the_reference(monkeypatch, tmp_path):
    """Without the reference, the merge study measures ours alone and says why."""
    monkeypatch.setenv(BENCHMARKS_ENV, str(tmp_path / "nowhere"))
    monkeypatch.delitem(sys.modules, "enchtable_benchmarks.torch_merge", raising=False)
    _, why = reference_module("torch_merge")
    from enchtable_jax.bench.studies import merge

    figures = merge.run(quick=True, repeats=1)
    assert figures["unavailable"] == {"torch": why}
    assert set(figures["seconds"]) == {"ours/tiny", "ours_cached/tiny", "ours_lora/tiny", "ours cold process/tiny",
                                       "floor (io + flops)/tiny", "exact-SVD bound/tiny"}
    assert "merge_speedup_vs_torch" not in figures and figures["merge_peak_rss_over_floor"]["median"] > 0
    assert figures["merge_over_svd_bound"]["median"] > 0
    assert bench.targets({"merge": figures})[0].keys() == {"merge_peak_rss_over_floor", "merge_over_svd_bound"}
    assert "| tiny |" in "\n".join(merge.markdown(figures))


@pytest.mark.parametrize("error,status,recorded", [
    (RuntimeError("disk on fire"), 1, {"error": "RuntimeError: disk on fire"}),
    (ModuleNotFoundError("No module named 'torch'", name="torch"), 0,
     {"unavailable": {"failing": "torch unavailable (ModuleNotFoundError: No module named 'torch')"}}),
    (ModuleNotFoundError("No module named 'enchtable_jax.nope'", name="enchtable_jax.nope"), 1,
     {"error": "ModuleNotFoundError: No module named 'enchtable_jax.nope'"}),  # our own bug, not an absent library
])
def test_failing_study_is_recorded(tmp_path, monkeypatch, error, status, recorded):
    study = types.ModuleType("failing_study")

    def run(quick, repeats):
        raise error

    study.run = run
    monkeypatch.setitem(sys.modules, "failing_study", study)
    monkeypatch.setitem(bench.SUITES, "failing", "failing_study")
    assert bench.main(["--suite", "failing", "--out", str(tmp_path)]) == status
    results = json.loads((tmp_path / "bench.json").read_text())
    assert results["suites"]["failing"] == recorded and results["targets"] == {}
    md = (tmp_path / "bench.md").read_text()
    assert (f"**failed**: `{recorded['error']}`" if "error" in recorded else "- failing: torch unavailable (") in md


def test_fresh_process_device_count_and_peak_rss():
    # what the scale study relies on: a child with N simulated CPU devices, reporting its own peak RSS
    code = ("import jax, numpy as np\nx = np.ones(ARGS['n'] // 8)\n"
            "print(json.dumps({'devices': len(jax.devices()), 'peak': peak_rss_bytes()}))")
    got = run_fresh(code, {"n": 200 * 2**20}, env=cpu_devices_env(3))
    assert got["devices"] == 3
    assert got["peak"] >= 200 * 2**20  # the 200 MiB array, not the parent's size


def test_scale_growth_and_plot(tmp_path):
    def point(kind, preset, devices, median, parameters):
        return {"kind": kind, "preset": preset, "devices": devices, "parameters": parameters,
                "seconds": {"min": median, "median": median, "max": median}}

    points = [point("merge", "tiny", 1, 1.0, 10), point("merge", "small", 1, 6.0, 30), point("merge", "small", 2, 4.0, 30),
              point("linearized_step", "tiny", 1, 0.1, 10), point("linearized_step", "small", 1, 0.2, 30),
              point("linearized_step", "small", 2, 0.4, 30)]
    growth = scale._size_growth(points, ["tiny", "small"])
    assert growth["merge"]["small / tiny"] == {"seconds_ratio": 6.0, "parameters_ratio": 3.0}
    speedup = scale._device_speedup(points, "small")
    assert speedup == {"merge": {"1": 1.0, "2": 1.5}, "linearized_step": {"1": 1.0, "2": 0.5}}
    figures = {"points": points, "sweep_preset": "small", "size_growth": growth, "speedup_vs_1_device": speedup}
    (path,) = scale.plot(figures, tmp_path)
    _assert_png(path)
    assert "| merge | small / tiny | 6 | 3 |" in scale.markdown(figures)


def test_mergekit_configurations_validate():
    config_module, why = optional_module("mergekit.config")
    if config_module is None:
        pytest.skip(why)
    from enchtable_jax.bench.studies import mergekit

    folders = {role: f"/models/{role}" for role in ("base", "task", "safe")}
    for method in mergekit.METHODS:
        config = config_module.MergeConfiguration.model_validate(mergekit.mergekit_config(method, folders))
        assert config.base_model.model.path == "/models/base" and len(config.models) == 2


def test_settings_reach_the_studies_that_take_them(tmp_path, monkeypatch, capsys):
    """`--set SUITE.NAME=VALUE` goes, as {NAME: [VALUE, ...]}, to that suite's `run(..., settings=)`, with `out` its
    own folder OUT/SUITE; a pair naming a suite not run, or a malformed pair, is a usage error (exit 2); a study
    that takes no settings refuses them (its failure is recorded)."""
    seen = {}
    study = types.ModuleType("settings_study")

    def run(quick, repeats, out, settings):
        seen.update(out=out, settings=settings)
        return {"setup": "s", "seconds": {}}

    study.run = run
    monkeypatch.setitem(sys.modules, "settings_study", study)
    monkeypatch.setitem(bench.SUITES, "takes", "settings_study")
    assert bench.main(["--suite", "takes", "--out", str(tmp_path), "--set", "takes.prompts=a=b.json",
                       "--set", "takes.prompts=c.json", "--set", "takes.mix=2"]) == 0
    assert seen == {"out": tmp_path / "takes", "settings": {"prompts": ["a=b.json", "c.json"], "mix": ["2"]}}
    for bad, message in (("takes.mix", "expected SUITE.NAME=VALUE"), ("mix=2", "expected SUITE.NAME=VALUE"),
                         ("merge.x=1", "suite 'merge' is not among the suites run")):
        with pytest.raises(SystemExit) as exit_info:
            bench.main(["--suite", "takes", "--out", str(tmp_path), "--set", bad])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert bench.main(["--suite", "ntk", "--quick", "--out", str(tmp_path), "--set", "ntk.x=1"]) == 1
    assert "takes no settings" in json.loads((tmp_path / "bench.json").read_text())["suites"]["ntk"]["error"]


def test_opt_in_studies_run_only_when_named():
    assert set(bench.OPT_IN) <= set(bench.SUITES)
    assert {"convert", "linearize", "ntk", "distill", "merge", "mergekit", "scale"} <= set(bench.SUITES) - set(bench.OPT_IN)
