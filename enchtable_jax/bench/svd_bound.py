"""How fast could ANY exact-SVD `enchtable` merge be on this machine? A bound for the merge speed targets.

Each merged matrix needs two thin SVDs (τ_task and α·τ_safe). `svd_bound` times one single-threaded float32 SVD
per distinct matrix shape of a preset — ours (`kernels.spectral.thin_svd`, compiled ahead, LAPACK limited to one
thread as the merge runs it) and, where torch imports, `torch.linalg.svd` on one thread (a wide matrix through its
transpose, as the reference does), both on a Gaussian random matrix like the merge study's deltas — and adds
them up over the model's matrices. Divided by the cores, that is the time a merge would need with perfect
parallelism and no reading, writing or interference work at all: the merge study's torch time over it bounds the
speed-up any exact-SVD implementation can reach against the PyTorch reference here, and our merge time over it
(`merge_over_svd_bound`) says how far from that bound we are. The same sums for the solver our merge runs on CPU
(`SOLVER`: the float64 Gram eigendecomposition, which finds the same kept triplets with fewer flops; DESIGN.md)
are reported apart (`solver_seconds_one_thread`, `solver_perfect_parallel_seconds`): our merge over them is its
overhead beyond its own decompositions.

Usage: python -m enchtable_jax.bench.svd_bound OUT.json [--preset NAME ...] [--cores N]
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from enchtable_jax.bench.optional import optional_module
from enchtable_jax.bench.synthetic import layer_matrices, shapes_of
from enchtable_jax.kernels.cpu_threads import blas_threads
from enchtable_jax.kernels.spectral import DEFAULT_KEEP, SOLVER_BY_PLATFORM, thin_svd, top_triplets
from enchtable_jax.models.init import preset_config

LARGE = 2**24  # entries above which one timed call is enough (an 8B layer's 14336×4096 takes minutes)
SOLVER = SOLVER_BY_PLATFORM["cpu"]  # the solver of our merges on CPU


def test_matrix(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """float32 N(0, 1) matrix of `shape`: the kind of delta the merge study decomposes (LAPACK's divide and conquer
    costs depend on the spectrum, so the bound uses the study's kind of matrix)."""
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """The fastest of `repeats` calls, in seconds."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def svd_seconds(shape: tuple[int, int], torch=None) -> dict[str, float]:
    """Seconds of one single-threaded decomposition of a `shape` matrix: the thin SVD {"ours": s, and given torch,
    "torch": s}, and our CPU solver's kept triplets {SOLVER: s}."""
    x = test_matrix(shape)
    repeats = 1 if x.size > LARGE else 3
    xj = jax.device_put(x)
    compiled = {"ours": jax.jit(thin_svd).lower(xj).compile(),  # compiled ahead: no warm-up of a minutes-long SVD
                SOLVER: jax.jit(lambda a: top_triplets(a, DEFAULT_KEEP, SOLVER)).lower(xj).compile()}
    with blas_threads(1):
        seconds = {impl: best_of(lambda fn=fn: jax.block_until_ready(fn(xj)), repeats) for impl, fn in compiled.items()}
    if torch is not None:
        xt = torch.from_numpy(np.ascontiguousarray(x.T) if shape[0] < shape[1] else x)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            if repeats > 1:
                torch.linalg.svd(xt, full_matrices=False)  # warm-up
            seconds["torch"] = best_of(lambda: torch.linalg.svd(xt, full_matrices=False), repeats)
        finally:
            torch.set_num_threads(threads)
    return seconds


def svd_bound(preset: str, cores: int | None = None, with_torch: bool = True,
              measured: dict[str, dict[str, float]] | None = None) -> dict:
    """The exact-SVD bound of a merge of every decoder-layer matrix of `preset` on `cores` cores (default: all).

    Returns the matrices by shape, each shape's single-threaded seconds (`shapes`, also filled into `measured`
    when given, so that presets sharing shapes time them once), their sum over the merge's SVDs per SVD
    implementation (`svd_seconds_one_thread`) and that sum over the cores (`perfect_parallel_seconds`), and the same
    two for our CPU solver (`solver_seconds_one_thread`, `solver_perfect_parallel_seconds`).
    """
    cores = cores or len(os.sched_getaffinity(0))
    torch = optional_module("torch")[0] if with_torch else None
    measured = {} if measured is None else measured
    shapes = shapes_of(preset_config(preset))
    counts = collections.Counter(shapes[name] for name in layer_matrices(shapes))
    total: dict[str, float] = collections.defaultdict(float)
    for shape, count in counts.items():
        key = f"{shape[0]}x{shape[1]}"
        if key not in measured:
            measured[key] = svd_seconds(shape, torch)
        for impl, seconds in measured[key].items():
            total[impl] += 2 * count * seconds  # τ_task and α·τ_safe
    solver = total.pop(SOLVER)
    return {"cores": cores, "matrices": {f"{s[0]}x{s[1]}": c for s, c in counts.items()},
            "shapes": {f"{s[0]}x{s[1]}": measured[f"{s[0]}x{s[1]}"] for s in counts},
            "svd_seconds_one_thread": dict(total),
            "perfect_parallel_seconds": {impl: t / cores for impl, t in total.items()},
            "solver": SOLVER, "solver_seconds_one_thread": solver,
            "solver_perfect_parallel_seconds": solver / cores}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m enchtable_jax.bench.svd_bound", description=__doc__.splitlines()[0])
    parser.add_argument("out", help="JSON file to write")
    parser.add_argument("--preset", action="append", help="model preset (repeatable; default smollm2-135m and "
                                                          "llama3-8b-layer)")
    parser.add_argument("--cores", type=int, help="cores to divide by (default: those this process may use)")
    args = parser.parse_args(argv)
    results = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
               "command": " ".join(["python -m enchtable_jax.bench.svd_bound",
                                    *(argv if argv is not None else sys.argv[1:])]),
               "load_average_before": os.getloadavg(), "presets": {}}
    measured: dict[str, dict[str, float]] = {}
    for preset in args.preset or ["smollm2-135m", "llama3-8b-layer"]:
        results["presets"][preset] = svd_bound(preset, args.cores, measured=measured)
        print(preset, json.dumps(results["presets"][preset]), flush=True)
    results["load_average_after"] = os.getloadavg()
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
