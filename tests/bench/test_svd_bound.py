"""The exact-SVD bound (bench/svd_bound.py) on the tiny preset: two SVDs per merged matrix, summed from the per-shape
timings it reports and divided by the cores given, and the same for our CPU solver, apart; torch's thread count is restored after its single-thread run;
the module's CLI writes the same figures."""

from __future__ import annotations

import json

import pytest

from enchtable_jax.bench import svd_bound
from enchtable_jax.bench.synthetic import layer_matrices, shapes_of
from enchtable_jax.models.init import preset_config


def test_bound_adds_two_svds_per_matrix_over_the_cores():
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    measured = {}
    bound = svd_bound.svd_bound("tiny", cores=3, measured=measured)
    assert torch.get_num_threads() == threads
    shapes = shapes_of(preset_config("tiny"))
    matrices = layer_matrices(shapes)
    assert sum(bound["matrices"].values()) == len(matrices)
    assert bound["shapes"] == measured and set(measured) == {f"{m}x{n}" for m, n in (shapes[k] for k in matrices)}
    for impl in ("ours", "torch"):
        total = sum(2 * count * measured[key][impl] for key, count in bound["matrices"].items())
        assert bound["svd_seconds_one_thread"][impl] == pytest.approx(total)
        assert bound["perfect_parallel_seconds"][impl] == pytest.approx(total / 3)
        assert all(0 < measured[key][impl] < 5 for key in measured)
    solver = sum(2 * count * measured[key][svd_bound.SOLVER] for key, count in bound["matrices"].items())
    assert bound["solver"] == "gram64" and bound["solver_seconds_one_thread"] == pytest.approx(solver)
    assert bound["solver_perfect_parallel_seconds"] == pytest.approx(solver / 3)
    assert svd_bound.SOLVER not in bound["perfect_parallel_seconds"]  # the SVD bound is the SVDs' alone


def test_cli_writes_the_bound(tmp_path):
    out = tmp_path / "bound.json"
    svd_bound.main([str(out), "--preset", "tiny", "--cores", "2"])
    written = json.loads(out.read_text())
    assert written["command"] == f"python -m enchtable_jax.bench.svd_bound {out} --preset tiny --cores 2"
    tiny = written["presets"]["tiny"]
    assert tiny["cores"] == 2 and tiny["perfect_parallel_seconds"]["ours"] == pytest.approx(
        tiny["svd_seconds_one_thread"]["ours"] / 2)
