"""Study: the `enchtable` merge end to end (read, merge, write) — ours vs a plain PyTorch reference, and
the physical floor.

Synthetic HF folders per size (random float32 weights): base; task = base + noise; a safety vector
(`bench.synthetic`: manifest naming the base by its digest) on every
2-D matrix of the decoder layers (attention and MLP, 7 per layer). Sizes: `--quick` the tiny preset;
full: 'smollm2-135m' (30 layers, 210 matrices, 420 SVDs) and 'llama3-8b-layer' (one Llama-3-8B-shaped
layer with its 128k-vocabulary embedding and head; 7 matrices, 14 SVDs).

Figures per size (in `sizes[preset]`, the timings also in `seconds` as "<impl>/<preset>"):
- ours = `enchtable_jax.merge('enchtable', base, task, safety_vector=..., out=..., progress=False,
  overwrite=True)` as a first merge: the vector's decomposition cache (merging/decomposition.py) is deleted
  before each call, so the call decomposes both deltas and writes the cache; ours_cached = the same merge with
  the cache in place (one SVD per matrix); ours_lora = the merge of a rank-16 PEFT adapter on every decoder
  matrix (`bench.synthetic.write_lora_adapter`) as the task, over the base, cache in place; torch = `merge` of
  `benchmarks/torch_merge.py` (same math, same output; where that file or torch is missing, ours is measured
  alone and the reason recorded) on the dense task model, and torch_lora the same on the adapter's dense
  merged model (base + scale·B·A written as a folder beforehand; its merging is not counted). Ours run in one
  spawned process and the PyTorch reference in another (`process.Worker`: in one process torch's worker threads
  outlive its calls and slow ours, and each side's output write-back would land in the other's time; each child
  syncs the disk after a call, outside its time); the calls alternate (`timing.alternate`, order rotating every
  repeat); the first call of each is a warm-up
  (JAX compilation) except for llama3-8b-layer, where one call takes minutes and compilation about a second
  of it, and for the `--quick` smoke run (warm-up 0). The machine load average before and after is recorded (other processes slow every
  side, torch's OpenMP threads markedly more).
- the exact-SVD bound (`bench.svd_bound`): the single-threaded SVD seconds of every merged matrix's two
  decompositions (the faster of ours and torch's per shape) over the cores: no exact-SVD first merge can
  be faster; `merge_over_svd_bound` = ours / that bound. Our CPU merges find the same triplets with fewer flops
  (the float64 Gram eigendecomposition, DESIGN.md), so they can pass below it; `merge_over_solver_bound` = ours /
  the same bound for that solver, the merge's overhead beyond its own decompositions.
- cold process: each implementation once more in a fresh `python -c` process, which also gives its peak
  RSS (a process maximum: VmHWM on Linux, since `ru_maxrss` there carries the parent's size over fork
  and exec) and its RSS after imports (the runtime's own memory). The torch process loads
  `torch_merge.py` by path, so it does not import JAX. RSS counts resident pages of the process: ours
  reads tensors with read() (anonymous memory only); safetensors' `safe_open` maps the files, so
  torch's RSS also counts the mapped pages it touched.
- floor: bytes that must move (task + safety read once, base of the merged tensors read once, the
  output written once) at the memory bandwidth of a large numpy copy (counted as read + write), plus
  the SVD and interference flops at the best float32 matmul rate measured (numpy and jax). SVD flops
  per m×n matrix (m ≥ n after transposing), thin U, Σ, V by R-SVD: 6mn² + 20n³ (Golub & Van Loan,
  Matrix Computations, 4th ed., Fig. 8.6.1); interference (block formula, k = ⌊n/2⌋):
  2k²(m + n) + 4k³. A floor, not a model: real SVDs run far below the matmul rate.
- agreement_with_torch: the two merged models compared tensor by tensor (`agreement`).

Headline figures (bench.json `targets`):
- `merge_speedup_vs_torch`: torch seconds / ours seconds, per repeat (paired by alternation), for the
  size where its median is smallest (so a target holds for every size); likewise
  `merge_cached_speedup_vs_torch` (torch / ours_cached), `merge_lora_speedup_vs_torch` (torch_lora /
  ours_lora) and `merge_over_svd_bound` (ours / the bound, largest over sizes);
- `merge_peak_rss_over_floor`: our cold-process peak RSS over the memory the streaming merge cannot
  avoid: 4 × the largest float32 group stack our executor forms (base, task and safety stacks and the
  merged stack, `MergePlan.groups` at the default group size and this process's device count, padded
  to whole device rounds) + the largest single output tensor (the one buffer the streaming writer
  holds, e.g. a copied embedding); the runtime (interpreter, JAX) is not in the floor, so it is
  meaningful only for the full sizes (`..._plus_runtime` adds the after-import RSS). Largest over sizes.
"""

from __future__ import annotations

import importlib.util
import math
import os
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from enchtable_jax.bench.optional import reference_module
from enchtable_jax.bench.process import Worker, run_fresh
from enchtable_jax.bench.svd_bound import svd_bound
from enchtable_jax.bench.synthetic import base_tensor, folder_bytes, layer_matrices, perturbed, shapes_of, \
    write_lora_adapter, write_model, write_safety_vector
from enchtable_jax.bench.timing import alternate, ratio, summary
from enchtable_jax.converters.peft import open_adapter
from enchtable_jax.merging.executor import DEFAULT_GROUP_BYTES, MergePlan, TensorPlan
from enchtable_jax.merging.pipeline import merge
from enchtable_jax.merging.sources import open_model
from enchtable_jax.models.init import preset_config

TASK_STD, SAFETY_STD = 0.002, 0.003
LORA_RANK = 16
SIZES = ("tiny", "smollm2-135m", "llama3-8b-layer")  # presets (models.init) that `--size` may choose

# Run by `process.run_fresh` (after its PRELUDE: peak_rss_bytes() and ARGS); print one JSON line.
_OURS = """
import time
from enchtable_jax.merging.pipeline import merge
from enchtable_jax.merging.sources import open_model
rss0 = peak_rss_bytes()
start = time.perf_counter()
merge("enchtable", ARGS["base"], ARGS["task"], safety_vector=ARGS["vector"], out=ARGS["out"], progress=False,
      overwrite=True)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "rss_after_import_bytes": rss0, "peak_rss_bytes": peak_rss_bytes()}))
"""
_TORCH = """
import importlib.util, time
spec = importlib.util.spec_from_file_location("torch_merge", ARGS["module"])
torch_merge = importlib.util.module_from_spec(spec)
spec.loader.exec_module(torch_merge)
rss0 = peak_rss_bytes()
start = time.perf_counter()
torch_merge.merge(ARGS["base"], ARGS["task"], ARGS["out"], safety_vector=ARGS["vector"], overwrite=True)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "rss_after_import_bytes": rss0, "peak_rss_bytes": peak_rss_bytes()}))
"""


def build_world(root: Path, preset: str, lora: bool = False) -> dict:
    """base, task and safety-vector folders under `root`, written tensor by tensor (never a whole model); with
    `lora`, also a rank-LORA_RANK adapter over the base ("adapter") and its dense merged model ("lora_task")."""
    config = preset_config(preset)
    shapes = shapes_of(config)
    names = layer_matrices(shapes)
    folders = {"base": write_model(root / "base", config),
               "task": write_model(root / "task", config, perturbed(1, TASK_STD)),
               "vector": write_safety_vector(root / "vector", root / "base", names, seed=2, std=SAFETY_STD)}
    if lora:
        folders["adapter"] = write_lora_adapter(root / "adapter", config, LORA_RANK, seed=3)
        adapter = open_adapter(folders["adapter"])

        def merged(name: str, shape: tuple[int, ...]) -> np.ndarray:
            x = base_tensor(name, shape)
            return x + adapter.delta(name) if name in adapter.targets else x

        folders["lora_task"] = write_model(root / "lora-task", config, merged)
    return {"config": config, "shapes": shapes, "merged": names, **folders}


def _clear_cache(vector: Path) -> None:
    """Delete the safety vector's decomposition cache, so the next merge is a first merge."""
    for path in vector.glob("safety_svd.*.safetensors"):
        path.unlink()


def svd_flops(m: int, n: int) -> float:
    """Thin SVD (U, Σ, V) of an m×n matrix by R-SVD, m ≥ n after transposing: 6mn² + 20n³ (GVL Fig. 8.6.1)."""
    m, n = max(m, n), min(m, n)
    return 6.0 * m * n * n + 20.0 * n**3


def interference_flops(m: int, n: int) -> float:
    """Block-formula interference: A = U1ᵀU2 (2mk²), B = V1ᵀV2 (2nk²), two k×k products (4k³)."""
    k = max(1, min(m, n) // 2)
    return 2.0 * k * k * (m + n) + 4.0 * k**3


def memory_bandwidth(nbytes: int, repeats: int = 5) -> float:
    """Bytes/s of a large numpy copy, counting bytes read + written (best of `repeats`)."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.zeros_like(src)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best


def matmul_rate(n: int, repeats: int = 3) -> dict[str, float]:
    """float32 FLOP/s of an n×n matmul in numpy (OpenBLAS) and jax (XLA), best of `repeats`."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
    dot = jax.jit(jnp.dot)
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    dot(ja, jb).block_until_ready()
    rates = {}
    for label, fn in (("numpy", lambda: a @ b), ("jax", lambda: dot(ja, jb).block_until_ready())):
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        rates[label] = 2.0 * n**3 / best
    return rates


def floor_memory(world: dict, devices: int) -> dict[str, int]:
    """The memory a streaming merge cannot avoid (see the module docstring)."""
    shapes = world["shapes"]
    tensors = {n: TensorPlan(n, shapes[n], np.dtype(np.float32), merge=True) for n in world["merged"]}
    groups = MergePlan(tensors, 1.0, {}).groups(DEFAULT_GROUP_BYTES, devices)
    stack = max((len(g) + (-len(g) % devices)) * 4 * math.prod(shapes[g[0]]) for g in groups)
    largest = max(4 * math.prod(s) for s in shapes.values())
    return {"largest_group_stack_bytes": stack, "largest_tensor_bytes": largest, "floor_bytes": 4 * stack + largest}


def agreement(ours: Path, torch_out: Path, task: Path, merged: list[str]) -> dict:
    """How far our merged model is from the PyTorch reference's, tensor by tensor (float64).

    `max_abs_over_max` is max|ours − torch| / max|torch| over a tensor (float tolerance of the stored
    weights); `safety_part` is ‖ours − torch‖ / ‖torch − task‖, the difference relative to what the merge
    added to the task model (w·α·τ_safe), which is where differing interference weights would show.
    Copied tensors must be byte-identical.
    """
    a, b, t = (open_model(folder, what) for folder, what in ((ours, "ours"), (torch_out, "torch"), (task, "task")))
    if set(a.specs) != set(b.specs):
        return {"same_tensor_names": False, "only_ours": sorted(set(a.specs) - set(b.specs)),
                "only_torch": sorted(set(b.specs) - set(a.specs))}
    worst_abs, worst_safety, copied_identical = (0.0, ""), (0.0, ""), True
    for name in sorted(a.specs):
        x, y = a.read(name), b.read(name)
        if name not in merged:
            copied_identical &= x.tobytes() == y.tobytes()
            continue
        x, y, z = x.astype(np.float64), y.astype(np.float64), t.read(name).astype(np.float64)
        worst_abs = max(worst_abs, (float(np.max(np.abs(x - y)) / np.max(np.abs(y))), name))
        worst_safety = max(worst_safety, (float(np.linalg.norm(x - y) / np.linalg.norm(y - z)), name))
    return {"same_tensor_names": True, "copied_identical": copied_identical, "max_abs_over_max": worst_abs[0],
            "max_abs_over_max_tensor": worst_abs[1], "safety_part": worst_safety[0],
            "safety_part_tensor": worst_safety[1]}


def _our_merges(world: dict[str, Path], outs: dict[str, Path]) -> dict:
    """{side: call} of our merges (first, cached, and the LoRA task when the world has one), built in their
    `Worker` process."""

    def ours(task: Path, out: Path, first: bool) -> None:
        if first:
            _clear_cache(world["vector"])
        merge("enchtable", world["base"], task, safety_vector=world["vector"], out=out, progress=False,
              overwrite=True)

    calls = {"ours": lambda: ours(world["task"], outs["ours"], True),
             "ours_cached": lambda: ours(world["task"], outs["ours_cached"], False)}
    if "adapter" in world:
        calls["ours_lora"] = lambda: ours(world["adapter"], outs["ours_lora"], False)
    return calls


def _torch_merges(world: dict[str, Path], outs: dict[str, Path], module: str) -> dict:
    """{side: call} of the PyTorch reference (`module`: its file), on the dense task and the adapter's dense merged
    model when the world has one, built in their `Worker` process (which then never imports JAX's merge)."""
    spec = importlib.util.spec_from_file_location("torch_merge", module)
    torch_merge = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(torch_merge)
    calls = {"torch": lambda: torch_merge.merge(world["base"], world["task"], outs["torch"],
                                                safety_vector=world["vector"], overwrite=True)}
    if "lora_task" in world:
        calls["torch_lora"] = lambda: torch_merge.merge(world["base"], world["lora_task"], outs["torch_lora"],
                                                        safety_vector=world["vector"], overwrite=True)
    return calls


def _timed_sides(world: dict, outs: dict[str, Path], torch_module: str | None, repeats: int, warmup: int
                 ) -> dict[str, list[float]]:
    """Seconds of each side after its warm-up calls, the sides alternating, ours and torch's each in a process of
    its own."""
    paths = {k: v for k, v in world.items() if isinstance(v, Path)}
    inputs = list(paths.values())  # read through before each call (`Worker`): both sides start from the page cache
    workers = [Worker("ours", _our_merges, paths, outs, inputs=inputs)]
    if torch_module is not None:
        workers.append(Worker("torch", _torch_merges, paths, outs, torch_module, inputs=inputs))
    try:
        sides = {side: worker for worker in workers for side in _SIDES[worker.side]
                 if "adapter" in paths or not side.endswith("_lora")}  # the LoRA sides need the world's adapter
        alternate({side: worker.runner(side) for side, worker in sides.items()}, repeats, warmup=warmup)
        return {side: worker.seconds[side][warmup:] for side, worker in sides.items()}
    finally:
        for worker in workers:
            worker.close()


_SIDES = {"ours": ("ours", "ours_cached", "ours_lora"), "torch": ("torch", "torch_lora")}


def study_size(root: Path, preset: str, repeats: int, warmup: int, rates: dict, measured: dict) -> dict:
    """All figures for one size (see the module docstring); ours alone when the PyTorch reference is missing.
    `measured`: single-threaded SVD seconds per shape, shared between sizes (`svd_bound`)."""
    torch_merge, missing = reference_module("torch_merge")
    lora = preset != "llama3-8b-layer"  # two more minutes-long torch merges there: the LoRA figure is measured below
    world = build_world(root, preset, lora=lora)
    outs = {impl: root / f"out-{impl}" for impl in ("ours", "ours_cached", "ours_lora", "torch", "torch_lora")}
    args = {"base": str(world["base"]), "task": str(world["task"]), "vector": str(world["vector"])}
    load = [os.getloadavg()[0]]  # other processes on the machine slow both sides; recorded to judge the noise
    times = _timed_sides(world, outs, None if torch_merge is None else torch_merge.__file__, repeats, warmup)
    load.append(os.getloadavg()[0])
    _clear_cache(world["vector"])
    cold = {"ours": run_fresh(_OURS, {**args, "out": str(outs["ours"])})}
    if torch_merge is not None:
        cold["torch"] = run_fresh(_TORCH, {**args, "out": str(outs["torch"]), "module": torch_merge.__file__})
    bound = svd_bound(preset, with_torch=preset != "llama3-8b-layer", measured=measured)
    bound_seconds = min(bound["perfect_parallel_seconds"].values())

    shapes = world["shapes"]
    out_bytes = folder_bytes(outs["ours"])
    vector_file = world["vector"] / "safety_vector.safetensors"
    moved = (folder_bytes(world["task"]) + sum(4 * math.prod(shapes[n]) for n in world["merged"])
             + vector_file.stat().st_size + out_bytes)
    flops_svd = sum(2 * svd_flops(*shapes[n]) for n in world["merged"])
    flops_interference = sum(interference_flops(*shapes[n]) for n in world["merged"])
    floor_io = moved / rates["memory_bandwidth_bytes_per_s"]
    floor_flops = (flops_svd + flops_interference) / rates["matmul_flops_per_s"]
    memory = floor_memory(world, len(jax.devices()))
    peak = cold["ours"]["peak_rss_bytes"]
    figures = {
        "preset": preset, "repeats": repeats, "warmup": warmup, "merged_matrices": len(world["merged"]),
        "svds": 2 * len(world["merged"]), "load_average_1min_before_after": load,
        "seconds": {**{impl: summary(t) for impl, t in times.items()},
                    **{f"{impl}_cold_process": c["seconds"] for impl, c in cold.items()}},
        "cold": cold,
        "floor": {"bytes_moved": moved, "seconds_io": floor_io, "svd_flops": flops_svd,
                  "interference_flops": flops_interference, "seconds_flops": floor_flops,
                  "seconds": floor_io + floor_flops, **memory},
        "svd_bound": bound,
        "ours_over_floor_seconds": summary([t / (floor_io + floor_flops) for t in times["ours"]]),
        "merge_over_svd_bound": summary([t / bound_seconds for t in times["ours"]]),
        "merge_over_solver_bound": summary([t / bound["solver_perfect_parallel_seconds"] for t in times["ours"]]),
        "merge_peak_rss_over_floor": peak / memory["floor_bytes"],
        "merge_peak_rss_over_floor_plus_runtime": peak / (memory["floor_bytes"]
                                                          + cold["ours"]["rss_after_import_bytes"]),
        "samples": times,
    }
    if torch_merge is None:
        return {**figures, "unavailable": {"torch": missing}}
    figures.update({
        "merge_speedup_vs_torch": ratio(times["torch"], times["ours"]),
        "merge_cached_speedup_vs_torch": ratio(times["torch"], times["ours_cached"]),
        "merge_speedup_vs_torch_cold_process": cold["torch"]["seconds"] / cold["ours"]["seconds"],
        "torch_peak_rss_over_ours": cold["torch"]["peak_rss_bytes"] / peak,
        "agreement_with_torch": agreement(outs["ours"], outs["torch"], world["task"], world["merged"])})
    if lora:
        figures["merge_lora_speedup_vs_torch"] = ratio(times["torch_lora"], times["ours_lora"])
        figures["lora_agreement_with_torch"] = agreement(outs["ours_lora"], outs["torch_lora"], world["lora_task"],
                                                         world["merged"])
    return figures


# figure -> whether the worst size is the one with the smallest median (speed-ups) or the largest (ratios of time)
HEADLINE = {"merge_speedup_vs_torch": min, "merge_cached_speedup_vs_torch": min, "merge_lora_speedup_vs_torch": min,
            "merge_over_svd_bound": max}


def run(quick: bool = False, repeats: int | None = None, size: str | None = None) -> dict:
    presets = [size] if size else ["tiny"] if quick else ["smollm2-135m", "llama3-8b-layer"]
    small = quick or size == "tiny"
    bandwidth = memory_bandwidth((256 if small else 1024) * 2**20)
    matmul = matmul_rate(1024 if small else 4096)
    rates = {"memory_bandwidth_bytes_per_s": bandwidth, "matmul_flops_per_s": max(matmul.values()),
             "matmul_flops_per_s_by_library": matmul}
    sizes, measured = {}, {}
    for preset in presets:
        big = preset == "llama3-8b-layer"
        count = repeats or (1 if big else 3)
        with tempfile.TemporaryDirectory(prefix=f"merge-study-{preset}-") as tmp:
            # No warm-up for the 8B layer (a call takes minutes, compiling a second of it) nor for the quick smoke run.
            sizes[preset] = study_size(Path(tmp), preset, count, 0 if big or small else 1, rates, measured)
    seconds = {}
    for preset, s in sizes.items():
        for impl, t in s["seconds"].items():
            if isinstance(t, dict):
                seconds[f"{impl}/{preset}"] = t
        for impl in ("ours", "torch"):
            if f"{impl}_cold_process" in s["seconds"]:
                seconds[f"{impl} cold process/{preset}"] = summary([s["seconds"][f"{impl}_cold_process"]])
        seconds[f"floor (io + flops)/{preset}"] = summary([s["floor"]["seconds"]])
        seconds[f"exact-SVD bound/{preset}"] = summary([min(s["svd_bound"]["perfect_parallel_seconds"].values())])
    heaviest = max(sizes.values(), key=lambda s: s["merge_peak_rss_over_floor"])
    figures = {
        "preset": ", ".join(presets), "scope": "all 2-D layer matrices", "batch": "-",
        "repeats": ", ".join(f"{s['repeats']} ({p})" for p, s in sizes.items()), "devices": len(jax.devices()),
        "rates": rates, "seconds": seconds, "sizes": sizes,
        "merge_peak_rss_over_floor": {**summary([heaviest["merge_peak_rss_over_floor"]]),
                                      "preset": heaviest["preset"]},
    }
    for key, worst in HEADLINE.items():
        having = [s for s in sizes.values() if key in s]
        if having:
            chosen = worst(having, key=lambda s: s[key]["median"])
            figures[key] = {**chosen[key], "preset": chosen["preset"]}
    if "merge_speedup_vs_torch" not in figures:
        figures["unavailable"] = next(iter(sizes.values()))["unavailable"]
    return figures


def markdown(figures: dict) -> list[str]:
    """Per size: seconds of each side, speed-ups, the exact-SVD bound, peak RSS over the floor, and agreement."""
    lines = ["| size | ours s (first) | cached s | LoRA s | torch s | torch LoRA s | torch / ours | torch / cached | "
             "torch LoRA / LoRA | ours / SVD bound | ours / solver bound | peak RSS / floor | max abs diff / max | "
             "diff / safety part |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    nan = {"median": float("nan")}
    for preset, s in figures["sizes"].items():
        agree = s.get("agreement_with_torch", {})
        cells = [s["seconds"].get(impl, nan)["median"] for impl in ("ours", "ours_cached", "ours_lora", "torch",
                                                                     "torch_lora")]
        cells += [s.get(key, nan)["median"] for key in ("merge_speedup_vs_torch", "merge_cached_speedup_vs_torch",
                                                        "merge_lora_speedup_vs_torch", "merge_over_svd_bound",
                                                        "merge_over_solver_bound")]
        cells += [s["merge_peak_rss_over_floor"], agree.get("max_abs_over_max", float("nan")),
                  agree.get("safety_part", float("nan"))]
        lines.append(f"| {preset} | " + " | ".join(f"{c:.3g}" for c in cells) + " |")
    return lines
