"""Study: our task arithmetic, TIES, DARE, Model Breadcrumbs and Model Stock against mergekit's, end to end
(read three HF folders, merge every tensor, write an HF folder), in seconds.

Synthetic float32 folders (`bench.synthetic`): base; task = base + noise; safe = base + τ_safe with
τ_safe noise on every tensor, so that both merge every tensor (ours copies a tensor where τ_safe is
exactly zero, mergekit would still sparsify it). mergekit gets base_model = base and models task
(weight 1) and safe (weight α = 1), configured as in tests/merging/test_mergekit.py, where the outputs
are checked against ours; ours is `merge(method, base, task, aligned=safe, harmful=base, alpha=1,
out=...)`, so τ_safe = safe − base by the same float32 subtraction (ours reads the
base folder twice, once as `harmful`: that is counted against it). Options at our defaults: TIES
density 0.5 (mergekit `normalize: true`), DARE density 0.5 (mergekit `dare_linear`, `rescale: false`,
weights 1/p and α/p, our 1/density rescale), breadcrumbs density 0.9, gamma 0.01, Model Stock per
tensor (`filter_wise: false`). mergekit runs on the CPU with its defaults otherwise (torch threads).

Each side runs in a child process of its own (`process.Worker`), and for each method the two alternate (first
call of each is a warm-up); each times its own call and then syncs the disk, outside its time. In one process the
two can disturb each other: torch's worker threads outlive mergekit's call, and mergekit returns with its output's
540 MB still dirty in the page cache (it does not fsync; ours does), so the kernel writes it back during our next
call. Measured at SmolLM2-135M's shape on the shared 2-core machine (load 5-8, noisy): our task
arithmetic took 2.7-5.0 s alone and 5.5-8.6 s alternating with mergekit in the same process. Both write
into a folder that is replaced every call. `speedup_vs_mergekit[method]` = mergekit seconds / ours, per
repeat; `slowest_speedup_vs_mergekit` the smallest of them over the methods, per repeat.
`max_abs_difference[method]` compares the two last outputs, tensor by tensor (not for DARE, whose random
masks differ). At SmolLM2-135M's shape TIES and breadcrumbs differ by up to about one
delta entry: among the 28M entries of the embedding many float32 magnitudes are equal, and the two
implementations keep different ones of those tied at the top-k threshold. Sizes (`SIZES`; `--size` either):
`--quick` the tiny preset; full: SmolLM2-135M's shape (TIES and breadcrumbs rank the magnitudes of every delta,
28M entries for the embedding).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np

from enchtable_jax.bench.optional import optional_module
from enchtable_jax.bench.process import Worker
from enchtable_jax.bench.synthetic import perturbed, write_model
from enchtable_jax.bench.timing import alternate, ratio, summary
from enchtable_jax.converters.hf import index_weights, iter_tensors
from enchtable_jax.errors import EnchtableError
from enchtable_jax.merging.pipeline import merge
from enchtable_jax.models.init import preset_config

TASK_STD, SAFETY_STD = 0.002, 0.003
ALPHA = 1.0
_LINEAR = {"normalize": False, "rescale": False, "lambda": 1.0, "int8_mask": False}
# method -> (our options, mergekit method, mergekit weights (task, safe), shared parameters, per-model parameters)
METHODS = {
    "task_arithmetic": ({}, "task_arithmetic", (1.0, ALPHA), _LINEAR, {}),
    "ties": ({"density": 0.5}, "ties", (1.0, ALPHA), {**_LINEAR, "normalize": True}, {"density": 0.5}),
    "dare": ({"density": 0.5}, "dare_linear", (1.0 / 0.5, ALPHA / 0.5), _LINEAR, {"density": 0.5}),
    "breadcrumbs": ({"density": 0.9, "gamma": 0.01}, "breadcrumbs", (1.0, ALPHA), _LINEAR,
                    {"density": 0.9, "gamma": 0.01}),
    "model_stock": ({}, "model_stock", (None, None), {"filter_wise": False}, {}),
}
RANDOM = {"dare"}
SIDES = ("ours", "mergekit")
SIZES = ("tiny", "smollm2-135m")  # `--quick` the first, full the second
WARMUP = 1


def mergekit_config(method: str, folders: dict[str, Path]) -> dict:
    """mergekit's YAML configuration (as a dict) for one of `METHODS`."""
    _, name, weights, shared, per_model = METHODS[method]
    models = [{"model": str(folders[role]), "parameters": {**({"weight": w} if w is not None else {}), **per_model}}
              for role, w in (("task", weights[0]), ("safe", weights[1]))]
    return {"merge_method": name, "base_model": str(folders["base"]), "dtype": "float32", "out_dtype": "float32",
            "models": models, **({"parameters": shared} if shared else {})}


def _mergekit_runner(mergekit, method: str, folders: dict[str, Path], out: Path):
    """A call that runs mergekit's merge into `out` (replaced), as its CLI would."""
    config = mergekit["config"].MergeConfiguration.model_validate(mergekit_config(method, folders))
    options = mergekit["merge"].MergeOptions(device="cpu", copy_tokenizer=False, write_model_card=False, quiet=True,
                                            random_seed=0)

    def call():
        shutil.rmtree(out, ignore_errors=True)
        mergekit["merge"].run_merge(config, str(out), options)

    return call


def _ours_runner(method: str, folders: dict[str, Path], out: Path):
    options = METHODS[method][0]
    return lambda: merge(method, folders["base"], folders["task"], aligned=folders["safe"], harmful=folders["base"],
                         alpha=ALPHA, out=out, progress=False, overwrite=True, **options)


def _sides(side: str, folders: dict[str, Path], outs: dict[str, Path]) -> dict:
    """{method: call} of one side, built in its `Worker` process (torch is not even imported on ours)."""
    if side == "ours":
        return {m: _ours_runner(m, folders, outs[m]) for m in METHODS}
    modules = {part: optional_module(f"mergekit.{part}")[0] for part in ("config", "merge")}
    return {m: _mergekit_runner(modules, m, folders, outs[m]) for m in METHODS}


def max_abs_difference(a: Path, b: Path) -> float:
    """Largest |a − b| over every tensor of two HF folders with the same tensors (float64)."""
    index_a, index_b = index_weights(a), index_weights(b)
    if set(index_a.tensors) != set(index_b.tensors):
        raise EnchtableError(f"{a} and {b} hold different tensors")
    theirs = dict(iter_tensors(index_b))
    return max(float(np.max(np.abs(x.astype(np.float64) - theirs[n].astype(np.float64))))
               for n, x in iter_tensors(index_a))


def run(quick: bool = False, repeats: int | None = None, size: str | None = None) -> dict:
    preset = size or SIZES[0 if quick else 1]
    repeats = repeats or 2
    modules = {part: optional_module(f"mergekit.{part}") for part in ("config", "merge")}
    missing = next((why for _, why in modules.values() if why), None)
    setup = f"{preset}, every tensor merged, α = {ALPHA}, {repeats} repeats after a warm-up, each side in its process"
    if missing:
        return {"preset": preset, "setup": setup, "repeats": repeats, "seconds": {},
                "unavailable": {f"mergekit/{m}": missing for m in METHODS}}
    config = preset_config(preset)
    seconds, speedup, difference, samples, per_repeat = {}, {}, {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="mergekit-study-") as tmp:
        tmp = Path(tmp)
        folders = {"base": write_model(tmp / "base", config),
                   "task": write_model(tmp / "task", config, perturbed(1, TASK_STD)),
                   "safe": write_model(tmp / "safe", config, perturbed(2, SAFETY_STD))}
        outs = {side: {m: tmp / f"{side}-{m}" for m in METHODS} for side in SIDES}
        workers = {side: Worker(side, _sides, side, folders, outs[side], inputs=list(folders.values()))
                   for side in SIDES}
        try:
            for method in METHODS:
                alternate({side: w.runner(method) for side, w in workers.items()}, repeats, warmup=WARMUP)
                times = {side: worker.seconds[method][WARMUP:] for side, worker in workers.items()}
                for side, t in times.items():
                    seconds[f"{side}/{method}"] = summary(t)
                    samples[f"{side}/{method}"] = t
                speedup[method] = ratio(times["mergekit"], times["ours"])
                per_repeat[method] = [m / o for m, o in zip(times["mergekit"], times["ours"])]
                if method not in RANDOM:
                    difference[method] = max_abs_difference(outs["ours"][method], outs["mergekit"][method])
                for side in SIDES:
                    shutil.rmtree(outs[side][method], ignore_errors=True)
        finally:
            for worker in workers.values():
                worker.close()
    return {"preset": preset, "setup": setup, "repeats": repeats, "alpha": ALPHA, "seconds": seconds,
            "speedup_vs_mergekit": speedup, "slowest_speedup_vs_mergekit": slowest(per_repeat, speedup),
            "max_abs_difference": difference, "samples": samples}


def slowest(per_repeat: dict[str, list[float]], speedup: dict[str, dict[str, float]]) -> dict[str, float]:
    """The smallest speedup over the methods, per repeat, summarised; `of_medians` the smallest ratio of medians."""
    return {**summary([min(r) for r in zip(*per_repeat.values())]),
            "of_medians": min(s["of_medians"] for s in speedup.values())}


def markdown(figures: dict) -> list[str]:
    """How far apart the two implementations' outputs are (DARE's random masks differ by design)."""
    if not figures.get("max_abs_difference"):
        return []
    return ["Largest |ours − mergekit| over every merged tensor: "
            + ", ".join(f"{m} {d:.3g}" for m, d in figures["max_abs_difference"].items()) + "."]
