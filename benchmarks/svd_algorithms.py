"""Every SVD algorithm of this machine's first device, timed at the merge's matrix shapes, with ι's accuracy bound.

For each shape and each `jax.lax.linalg.SvdAlgorithm` (the one `kernels.spectral.thin_svd` picks here from
SVD_ALGORITHMS is marked "(table)"; that its platform dispatch picks it is checked first), one jitted ι of a
float32 pair (τ_task, τ_safe) — two thin SVDs, the kept triplets, the block formula, as the merge computes it per
matrix — is timed (best of 3; of 1 above LARGE entries, compiled ahead so a long SVD runs no warm-up) and
compared with ι in float64: numpy's SVDs up to NUMPY_ORACLE entries, above that JAX's default SVD in float64 on
the same device (numpy would take minutes per 14336×4096 matrix). `ok`: within BOUND relative, the merge's
accuracy bound. An algorithm the platform lacks is recorded as unsupported. Gaussian
matrices like the merge study's deltas; τ_safe shares a fifth of τ_task so that ι is well above zero.

benchmarks/device_check.sh runs it on an accelerator so that the first session with a GPU can confirm or change
`spectral.SVD_ALGORITHMS` (DESIGN.md, "SVD solvers per backend"). The JSON is rewritten after every measurement, so
a run stopped by its time limit keeps what it measured.

Usage: python benchmarks/svd_algorithms.py OUT.json [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.lax.linalg import SvdAlgorithm

from enchtable_jax.bench.svd_bound import LARGE, best_of, test_matrix
from enchtable_jax.kernels.cpu_threads import blas_threads
from enchtable_jax.kernels.spectral import DEFAULT_KEEP, DEFAULT_SCALE, interference_blocks, kept, svd_algorithm, \
    thin_svd, top_triplets

SHAPES = ((576, 576), (1536, 576), (1024, 1024), (4096, 4096), (14336, 4096))  # SmolLM2's, then Llama-3-8B's
QUICK_SHAPES = ((96, 64), (64, 160))
NUMPY_ORACLE = 2**21  # entries up to which numpy computes the float64 reference
BOUND = 1e-4
# the likely fastest first, so that a run stopped by its time limit has the comparisons that matter
ORDER = (SvdAlgorithm.POLAR, SvdAlgorithm.DEFAULT, SvdAlgorithm.QR, SvdAlgorithm.DIVIDE_AND_CONQUER,
         SvdAlgorithm.JACOBI)


def pair(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(τ_task, τ_safe) float32 of `shape`, τ_safe = 0.8·N(0, 1) + 0.2·τ_task."""
    task = test_matrix(shape, seed=0)
    return task, (0.8 * test_matrix(shape, seed=1) + 0.2 * task).astype(np.float32)


def iota_numpy(task: np.ndarray, safety: np.ndarray) -> float:
    """ι in float64 from numpy's SVDs (block formula: scale·(Σ|A S2 Bᵀ| + Σ|Aᵀ S1 B|)/r²)."""
    tops = []
    for x in (task, safety):
        u, s, vt = np.linalg.svd(x.astype(np.float64), full_matrices=False)
        k = kept(x.shape, DEFAULT_KEEP)
        tops.append((u[:, :k], s[:k], vt[:k].T))
    (u1, s1, v1), (u2, s2, v2) = tops
    a, b = u1.T @ u2, v1.T @ v2
    total = np.abs((a * s2) @ b.T).sum() + np.abs((a.T * s1) @ b).sum()
    return float(DEFAULT_SCALE * total / (s1.size + s2.size) ** 2)


def thin_top(algorithm: SvdAlgorithm | None):
    """The kept triplets by `thin_svd(·, algorithm)` in float32, as the merge takes them."""
    return lambda x: top_triplets(x, DEFAULT_KEEP, algorithm=algorithm)


def float64_top(x):
    """The kept triplets by JAX's default SVD in the input's precision (float64 for the on-device reference)."""
    u, s, vt = jnp.linalg.svd(x, full_matrices=False)
    k = kept(x.shape, DEFAULT_KEEP)
    return u[:, :k], s[:k], vt[:k].T


def iota_fn(top):
    """Jitted ι of two matrices from their kept triplets by `top`."""
    def iota(task, safety):
        (u1, s1, v1), (u2, s2, v2) = top(task), top(safety)
        return DEFAULT_SCALE * interference_blocks(u1, s1, v1, u2, s2, v2) / (s1.size + s2.size) ** 2

    return jax.jit(iota)


def reference(task: np.ndarray, safety: np.ndarray) -> tuple[float, str]:
    """(float64 ι, where it was computed)."""
    if task.size <= NUMPY_ORACLE:
        return iota_numpy(task, safety), "numpy float64"
    with jax.enable_x64(True):
        iota = iota_fn(float64_top)(task.astype(np.float64), safety.astype(np.float64))
        return float(iota), f"jax float64 on {jax.devices()[0].platform}"


def lowering_platform(device: jax.Device) -> str:
    """The platform name `lax.platform_dependent` (and so SVD_ALGORITHMS) uses for `device`: cuda or rocm for GPUs."""
    if device.platform != "gpu":
        return device.platform
    return "rocm" if "rocm" in str(getattr(device.client, "platform_version", "")).lower() else "cuda"


def measure(algorithm: SvdAlgorithm | None, task: jax.Array, safety: jax.Array, expected: float) -> dict:
    """Seconds per ι (two SVDs) and its relative error, or why the algorithm cannot run here."""
    try:
        compiled = iota_fn(thin_top(algorithm)).lower(task, safety).compile()
    except NotImplementedError as e:
        return {"unsupported": str(e).splitlines()[0]}
    repeats = 1 if task.size > LARGE else 3
    if repeats > 1:
        jax.block_until_ready(compiled(task, safety))  # first call: solver handles and workspaces
    values = []
    seconds = best_of(lambda: values.append(jax.block_until_ready(compiled(task, safety))), repeats)
    error = abs(float(values[-1]) - expected) / expected
    return {"seconds": seconds, "relative_error": error, "ok": error <= BOUND}


def table_dispatch_matches(device: jax.Device) -> bool:
    """Whether `thin_svd` without an algorithm gives, bit for bit, the singular values of the table's algorithm on
    this device (its `lax.platform_dependent` dispatch picked the entry of this platform)."""
    x = jax.device_put(test_matrix((96, 64)), device)
    chosen = svd_algorithm(lowering_platform(device), x.shape)
    table = jax.jit(lambda a: thin_svd(a)[1])(x)
    explicit = jax.jit(lambda a: thin_svd(a, chosen)[1])(x)
    return bool(np.array_equal(np.asarray(table), np.asarray(explicit)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="JSON file to (re)write after every measurement")
    parser.add_argument("--quick", action="store_true", help="two small shapes (proves the script on a CPU)")
    args = parser.parse_args(argv)
    device = jax.devices()[0]
    results = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
               "command": " ".join(["python benchmarks/svd_algorithms.py", *(argv or sys.argv[1:])]),
               "device": f"{device.platform} {device.device_kind}", "cores": os.cpu_count(), "bound": BOUND,
               "rows": []}
    results["table_dispatch_matches"] = table_dispatch_matches(device)
    print(f"thin_svd without an algorithm runs the table's entry for {lowering_platform(device)}: "
          f"{results['table_dispatch_matches']}\n")
    print("| shape | algorithm | seconds per ι (2 SVDs) | relative error of ι | within 1e-4 | reference |")
    print("|---|---|---|---|---|---|", flush=True)
    one_thread = blas_threads(1) if device.platform == "cpu" else contextlib.nullcontext()  # as the merge runs LAPACK
    with one_thread:
        measure_all(QUICK_SHAPES if args.quick else SHAPES, device, results, Path(args.out))


def measure_all(shapes, device: jax.Device, results: dict, out: Path) -> None:
    """Every algorithm at every shape, a table row printed and `out` rewritten after each."""
    for shape in shapes:
        task_np, safety_np = pair(shape)
        start = time.perf_counter()
        expected, where = reference(task_np, safety_np)
        reference_seconds = time.perf_counter() - start
        task, safety = jax.device_put(task_np), jax.device_put(safety_np)
        chosen = svd_algorithm(lowering_platform(device), shape)
        for algorithm in ORDER:
            name = f"{algorithm.name} (table)" if algorithm == chosen else algorithm.name
            row = {"shape": list(shape), "algorithm": name, "reference": where, "reference_iota": expected,
                   "reference_seconds": reference_seconds, **measure(algorithm, task, safety, expected)}
            results["rows"].append(row)
            out.write_text(json.dumps(results, indent=2) + "\n")
            cells = ([f"{row['seconds']:.4g}", f"{row['relative_error']:.2e}", "yes" if row["ok"] else "NO"]
                     if "seconds" in row else ["unsupported", "", ""])
            print(f"| {shape[0]}x{shape[1]} | {name} | " + " | ".join(cells) + f" | {where} |", flush=True)


if __name__ == "__main__":
    main()
