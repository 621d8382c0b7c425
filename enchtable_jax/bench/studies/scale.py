"""Study: how our merge and our linearized training step grow with model size and with device count.

Model sizes (random weights, 1 device): the tiny preset, SmolLM2-135M's shape, and one Llama-3-8B-shaped
layer with its 128k vocabulary (`models.init.PRESETS`); device counts 1, 2, 4, 8 at SmolLM2-135M's shape.
`--quick`: the tiny preset only, on 1 and 2 devices.

Each point runs in a fresh process (`bench.process.run_fresh`), because JAX fixes its device count when
it starts: on a CPU host the child gets `--xla_force_host_platform_device_count=N` simulated devices
(which share the host's cores: they show the cost of sharding, not a speed-up the cores cannot give); on a
GPU/TPU host it uses the first N real devices, and counts beyond those present are skipped. The child
also reports its peak RSS (the process's, over both kinds: merge first, then the step). Points run one after the other, not alternating, so their ratios are noisier
than those of the other studies.
- merge: `merge('enchtable', base, task, safety_vector=..., out=..., mesh=merge_mesh(N devices))`, read,
  merge, write; the safety vector covers every 2-D matrix of the decoder layers (as in the merge study);
- linearized_step: one AdamW step of the `ffn` scope linearized (`studies.linearize.jax_step`), batch 8 x 64
  tokens (`--quick`: 8 x 16), on a ('data', 'fsdp') mesh with all N devices on 'fsdp': θ0, Δ and the
  optimizer state split over the devices, examples too. (Replicated data parallelism would hold N copies:
  18 GB peak RSS at 8 simulated devices for SmolLM2's shape, against 7 GB sharded.)
Compilation is excluded (a warm-up call), except for the 8B-shaped merge, where one call takes minutes.

Figures: `points` (every measurement), `seconds["<kind>/<preset>/<N>dev"]`, `size_growth[kind]` (median
seconds of each size over the previous one, with the parameter-count ratio) and
`speedup_vs_1_device[kind][N]` (median seconds on 1 device / on N).
"""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Callable
from pathlib import Path

import jax

from enchtable_jax.bench.plots import scale_curves
from enchtable_jax.bench.process import cpu_devices_env, run_fresh
from enchtable_jax.bench.synthetic import (
    layer_matrices,
    perturbed,
    shapes_of,
    write_model,
    write_safety_vector,
)
from enchtable_jax.bench.timing import alternate, summary
from enchtable_jax.errors import EnchtableError
from enchtable_jax.models.init import count_parameters, preset_config

KINDS = ("merge", "linearized_step")
TASK_STD, SAFETY_STD = 0.002, 0.003
_CHILD = """
from enchtable_jax.bench.studies.scale import measure
print(json.dumps({**measure(**ARGS), "peak_rss_bytes": peak_rss_bytes()}))
"""


def _merge_call(folders: dict[str, str], devices: list) -> Callable[[], None]:
    from enchtable_jax.merging.executor import merge_mesh
    from enchtable_jax.merging.pipeline import merge

    mesh = merge_mesh(devices)
    return lambda: merge("enchtable", folders["base"], folders["task"], safety_vector=folders["vector"],
                         out=folders["out"], progress=False, overwrite=True, mesh=mesh)


def _step_call(preset: str, devices: list, batch: tuple[int, int]) -> Callable[[], None]:
    from enchtable_jax.bench.studies.linearize import jax_step, token_batch
    from enchtable_jax.kernels.mesh import make_mesh
    from enchtable_jax.kernels.scopes import resolve_scope
    from enchtable_jax.models.init import init_params

    config = preset_config(preset)
    return jax_step(config, init_params(config, seed=0), resolve_scope(config, "ffn"),
                    token_batch(config.vocab_size, *batch), True, make_mesh(fsdp=len(devices), devices=devices))


def measure(preset: str, devices: int, runs: dict[str, list[int]], folders: dict[str, str],
            batch: tuple[int, int]) -> dict:
    """Seconds per call of each kind in `runs` ({kind: [repeats, warm-up]}) on the first `devices` devices of
    this process (run in the child), one kind after the other."""
    available = jax.devices()
    if len(available) < devices:
        raise RuntimeError(f"{devices} devices asked for, {len(available)} present")
    chosen = available[:devices]
    makers = {"merge": lambda: _merge_call(folders, chosen), "linearized_step": lambda: _step_call(preset, chosen, batch)}
    seconds = {}
    for kind, (repeats, warmup) in runs.items():
        if kind not in makers:
            raise EnchtableError(f"unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
        seconds[kind] = alternate({kind: makers[kind]()}, repeats, warmup=warmup)[kind]
    return {"seconds": seconds, "platform": chosen[0].platform}


def _points(preset: str, devices: int, runs: dict[str, tuple[int, int]], cpu: bool, **args) -> list[dict]:
    """Both kinds at one (size, device count), measured in one fresh process."""
    got = run_fresh(_CHILD, {"preset": preset, "devices": devices, "runs": runs, **args},
                    env=cpu_devices_env(devices) if cpu else None)
    points = []
    for kind, seconds in got["seconds"].items():
        print(f"[bench]   scale {kind} {preset} on {devices} device(s): {summary(seconds)['median']:.3f} s", flush=True)
        points.append({"kind": kind, "preset": preset, "devices": devices, "platform": got["platform"],
                       "parameters": count_parameters(shapes_of(preset_config(preset))), "repeats": runs[kind][0],
                       "warmup": runs[kind][1], "seconds": summary(seconds), "samples": seconds,
                       "process_peak_rss_bytes": got["peak_rss_bytes"]})
    return points


def _plan(quick: bool, repeats: int | None) -> tuple[list[str], str, list[int], dict]:
    """Sizes, the size of the device sweep, device counts, and (repeats, warm-up) per (kind, size)."""
    if quick:
        sizes, sweep, counts = ["tiny"], "tiny", [1, 2]
    else:
        sizes, sweep, counts = ["tiny", "smollm2-135m", "llama3-8b-layer"], "smollm2-135m", [1, 2, 4, 8]
    default = {("merge", "tiny"): (3, 1), ("linearized_step", "tiny"): (3, 1),
               ("merge", "smollm2-135m"): (2, 1), ("linearized_step", "smollm2-135m"): (3, 1),
               ("merge", "llama3-8b-layer"): (1, 0), ("linearized_step", "llama3-8b-layer"): (2, 1)}
    runs = {key: (repeats or r, w) for key, (r, w) in default.items()}
    return sizes, sweep, counts, runs


def run(quick: bool = False, repeats: int | None = None) -> dict:
    sizes, sweep, counts, runs = _plan(quick, repeats)
    cpu = jax.default_backend() == "cpu"
    if not cpu:
        counts = [n for n in counts if n <= len(jax.devices())]
    batch = (8, 16) if quick else (8, 64)
    points = []
    for preset in sizes:
        config = preset_config(preset)
        with tempfile.TemporaryDirectory(prefix=f"scale-study-{preset}-") as tmp:
            tmp = Path(tmp)
            base = write_model(tmp / "base", config)
            vector = write_safety_vector(tmp / "vector", base, layer_matrices(shapes_of(config)), 2, SAFETY_STD)
            folders = {"base": str(base), "task": str(write_model(tmp / "task", config, perturbed(1, TASK_STD))),
                       "vector": str(vector), "out": str(tmp / "out")}
            for devices in counts if preset == sweep else [1]:
                points += _points(preset, devices, {kind: runs[(kind, preset)] for kind in KINDS}, cpu,
                                  folders=folders, batch=batch)
    return {"preset": ", ".join(sizes), "setup": f"sizes {', '.join(sizes)} on 1 device; {sweep} on "
            f"{', '.join(map(str, counts))} {'simulated CPU' if cpu else jax.default_backend()} devices; "
            f"linearized step batch {batch[0]} x {batch[1]}", "batch": list(batch), "sweep_preset": sweep,
            "points": points, "seconds": {f"{p['kind']}/{p['preset']}/{p['devices']}dev": p["seconds"] for p in points},
            "size_growth": _size_growth(points, sizes), "speedup_vs_1_device": _device_speedup(points, sweep)}


def _size_growth(points: list[dict], sizes: list[str]) -> dict:
    """Per kind, for each size after the first: its median seconds and parameters over the previous size's."""
    growth = {}
    for kind in KINDS:
        one = {p["preset"]: p for p in points if p["kind"] == kind and p["devices"] == 1}
        growth[kind] = {f"{b} / {a}": {"seconds_ratio": one[b]["seconds"]["median"] / one[a]["seconds"]["median"],
                                       "parameters_ratio": one[b]["parameters"] / one[a]["parameters"]}
                        for a, b in itertools.pairwise(sizes)}
    return growth


def _device_speedup(points: list[dict], preset: str) -> dict:
    """Per kind: median seconds on 1 device over median seconds on N devices, at the sweep size."""
    speedup = {}
    for kind in KINDS:
        by_count = {p["devices"]: p["seconds"]["median"] for p in points if p["kind"] == kind and p["preset"] == preset}
        speedup[kind] = {str(n): by_count[1] / s for n, s in sorted(by_count.items())}
    return speedup


def plot(figures: dict, out: Path) -> list[Path]:
    """scale.png: the size and device-count curves."""
    return [scale_curves(figures["points"], KINDS, figures["sweep_preset"], out / "scale.png")]


def markdown(figures: dict) -> list[str]:
    """Growth with size and with device count, as tables."""
    rows = [f"| {kind} | {pair} | {g['seconds_ratio']:.3g} | {g['parameters_ratio']:.3g} |"
            for kind, pairs in figures["size_growth"].items() for pair, g in pairs.items()]
    lines = ["| kind | sizes | seconds ratio | parameters ratio |", "|---|---|---|---|", *rows, ""] if rows else []
    counts = sorted({int(n) for s in figures["speedup_vs_1_device"].values() for n in s})
    lines += ["| kind | " + " | ".join(f"{n} dev: 1-device s / s" for n in counts) + " |",
              "|---|" + "---|" * len(counts)]
    lines += [f"| {kind} | " + " | ".join(f"{s[str(n)]:.3g}" if str(n) in s else "" for n in counts) + " |"
              for kind, s in figures["speedup_vs_1_device"].items()]
    return lines
