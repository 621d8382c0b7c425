"""How fast could ANY exact-SVD `enchtable` merge be on this machine? A bound for the merge speed target.

Each merged matrix needs two thin SVDs (τ_task and α·τ_safe). This times one single-threaded float32
SVD per distinct matrix shape of the merge study's sizes — ours (`kernels.spectral.thin_svd`, jitted,
LAPACK limited to one thread as the merge runs it) and torch's `torch.linalg.svd` on one thread (a wide
matrix through its transpose, as the reference does), both on a Gaussian random matrix like the study's
deltas — and adds them up over the model's matrices. Dividing by the number of
cores gives the time a merge would need with perfect parallelism and no reading, writing or
interference work at all: the merge study's torch time over that figure bounds the speed-up any
exact-SVD implementation can reach against the PyTorch reference here.

Usage: python benchmarks/svd_bound.py OUT.json [--preset NAME ...]
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np
import torch

from enchtable_jax.bench.synthetic import layer_matrices, shapes_of
from enchtable_jax.kernels.cpu_threads import blas_threads
from enchtable_jax.kernels.spectral import thin_svd
from enchtable_jax.models.init import preset_config


def test_matrix(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """float32 N(0, 1) matrix of `shape`: the kind of delta the merge study decomposes (its cost in LAPACK's
    divide and conquer depends on the spectrum, so the bound uses the study's kind of matrix)."""
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up (compilation)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--preset", action="append", default=None)
    args = parser.parse_args()
    presets = args.preset or ["smollm2-135m", "llama3-8b-layer"]
    cores = os.cpu_count() or 1
    torch.set_num_threads(1)
    svd = jax.jit(thin_svd)
    results = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
               "command": "python benchmarks/svd_bound.py " + " ".join(sys.argv[1:]), "cores": cores,
               "load_average_before": os.getloadavg(), "shapes": {}, "presets": {}}
    for preset in presets:
        shapes = shapes_of(preset_config(preset))
        counts = collections.Counter(shapes[n] for n in layer_matrices(shapes))
        total = {"ours": 0.0, "torch": 0.0}
        for shape, count in counts.items():
            key = f"{shape[0]}x{shape[1]}"
            if key not in results["shapes"]:
                x = test_matrix(shape)
                xj, xt = jax.device_put(x), torch.from_numpy(x.T.copy() if shape[0] < shape[1] else x)
                repeats = 1 if x.size > 2**24 else 3
                with blas_threads(1):
                    ours = best_of(lambda xj=xj: jax.block_until_ready(svd(xj)), repeats)
                theirs = best_of(lambda xt=xt: torch.linalg.svd(xt, full_matrices=False), repeats)
                results["shapes"][key] = {"ours_s": ours, "torch_1thread_s": theirs}
                print(key, results["shapes"][key], flush=True)
            for impl, field in (("ours", "ours_s"), ("torch", "torch_1thread_s")):
                total[impl] += 2 * count * results["shapes"][key][field]  # τ_task and α·τ_safe
        results["presets"][preset] = {
            "matrices": {f"{s[0]}x{s[1]}": c for s, c in counts.items()},
            "svd_seconds_one_thread": total,
            "perfect_parallel_seconds": {impl: t / cores for impl, t in total.items()},
        }
        print(preset, json.dumps(results["presets"][preset]), flush=True)
    results["load_average_after"] = os.getloadavg()
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
