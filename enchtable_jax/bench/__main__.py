"""`python -m enchtable_jax.bench [--suite S ...] [--quick | --size NAME] [--out DIR] [--set S.NAME=V ...]`: run studies.

Writes into DIR: `bench.json` (machine, versions, load averages, every figure as min/median/max over
repeats with the raw samples, and `targets`: the headline medians), one PNG per study, and `bench.md`
(tables to paste into BENCHMARKS.md). Both files are rewritten after every study, so a long run that
stops keeps what it measured. A study that fails is recorded with its error and the others still run
(exit status 1). A comparison library that is missing (torch, mergekit) is recorded under `unavailable`:
by the study, which still measures our side, or, when a study cannot run at all without it, by the
harness in place of the study's figures.

The performance studies run by default; `safety` (the real-model safety study, an hour of CPU) only when
named with `--suite safety`. A study whose `run` takes `out` writes its own files under OUT/<suite>/; one
that takes `settings` receives the `--set SUITE.NAME=VALUE` given for it, as {NAME: [VALUE, ...]}. A study with
sizes declares their names in `SIZES` and takes `size`: `--size NAME` runs each study that knows NAME at that size
alone (the others as usual); a size no selected study knows is refused.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.metadata
import inspect
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import jax

from enchtable_jax.bench.plots import bars
from enchtable_jax.errors import EnchtableError

SUITES = {
    "convert": "enchtable_jax.bench.studies.convert",
    "linearize": "enchtable_jax.bench.studies.linearize",
    "ntk": "enchtable_jax.bench.studies.ntk",
    "distill": "enchtable_jax.bench.studies.distill",
    "merge": "enchtable_jax.bench.studies.merge",
    "mergekit": "enchtable_jax.bench.studies.mergekit",
    "scale": "enchtable_jax.bench.studies.scale",
    "safety": "enchtable_jax.bench.studies.safety",
    "gcg": "enchtable_jax.bench.studies.gcg",
}
OPT_IN = ("safety",)  # studies that run only when named: the real-model safety study takes an hour, not a timing
# target name -> (suite, figure key, goal): the medians reported in bench.json's `targets`.
TARGETS = {
    "merge_speedup_vs_torch": ("merge", "merge_speedup_vs_torch", (">=", 3.0)),
    "linearized_over_plain": ("linearize", "linearized_over_plain", ("<=", 1.6)),
    "linearized_speedup_vs_torch": ("linearize", "linearized_speedup_vs_torch", (">=", 1.0)),
    "convert_fraction_of_floor": ("convert", "convert_fraction_of_floor", (">=", 0.5)),
    "merge_peak_rss_over_floor": ("merge", "merge_peak_rss_over_floor", ("<=", 1.5)),
    "merge_cached_speedup_vs_torch": ("merge", "merge_cached_speedup_vs_torch", (">=", 2.5)),
    "merge_lora_speedup_vs_torch": ("merge", "merge_lora_speedup_vs_torch", (">=", 10.0)),
    "merge_over_svd_bound": ("merge", "merge_over_svd_bound", ("<=", 1.15)),
    "distill_step_over_linearize_step": ("distill", "distill_step_over_linearize_step", ("<=", 1.1)),
    "slowest_speedup_vs_mergekit": ("mergekit", "slowest_speedup_vs_mergekit", (">=", 1.0)),
    "gcg_step_speedup_vs_torch": ("gcg", "gcg_step_speedup_vs_torch", (">=", 1.0)),
}
VERSIONS = ("enchtable-jax", "jax", "jaxlib", "optax", "orbax-checkpoint", "numpy", "torch", "safetensors", "mergekit",
            "matplotlib")
THROUGHPUT_UNITS = {"tokens_per_second": "tokens/s", "megabytes_per_second": "MB/s", "examples_per_second": "examples/s",
                    "steps_per_second": "steps/s"}


def machine() -> dict:
    """What the numbers were measured on."""
    versions = {}
    for package in VERSIONS:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = None
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "memory_bytes": memory, "python": platform.python_version(),
            "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()], "versions": versions}


def load_average() -> list[float] | None:
    """1, 5 and 15-minute load averages (other work on the machine slows every implementation)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def targets(suites: dict) -> tuple[dict[str, float], dict[str, dict]]:
    """The headline medians, and for each its goal and whether this run met it."""
    values, goals = {}, {}
    for name, (suite, key, (op, bound)) in TARGETS.items():
        figure = suites.get(suite, {}).get(key)
        if isinstance(figure, dict) and "median" in figure:
            values[name] = figure["median"]
            met = figure["median"] >= bound if op == ">=" else figure["median"] <= bound
            goals[name] = {"goal": f"{op} {bound:g}", "met": bool(met)}
    return values, goals


def _is_summary(x) -> bool:
    return isinstance(x, dict) and {"min", "median", "max"} <= set(x)


def ratio_rows(figures: dict) -> list[tuple[str, dict]]:
    """(name, summary) of every ratio-like figure of a study: top-level or one level nested, not timings."""
    rows = []
    for key, value in figures.items():
        if key in ("seconds", "samples", "cold", "sizes", "points") or key in THROUGHPUT_UNITS:
            continue
        if _is_summary(value):
            rows.append((key, value))
        elif isinstance(value, dict):
            rows += [(f"{key} / {sub}", v) for sub, v in value.items() if _is_summary(v)]
    return rows


def _number(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.4g}"


def suite_markdown(suite: str, figures: dict, module=None) -> list[str]:
    """A study's tables: timings (with throughput), ratios, what was unavailable, the study's own lines."""
    setup = figures.get("setup") or (f"{figures.get('preset', '')}, batch {figures.get('batch', '')}, scope "
                                     f"{figures.get('scope', '')}, {figures.get('repeats', '')} repeats")
    lines = [f"### {suite} ({setup})", ""]
    if "error" in figures:
        return [*lines, f"**failed**: `{figures['error']}`", ""]
    throughput = [k for k in THROUGHPUT_UNITS if k in figures]
    if figures.get("seconds"):
        lines += ["| implementation | median s | min s | max s |" + "".join(f" {THROUGHPUT_UNITS[k]} (median) |"
                                                                       for k in throughput),
                  "|---|---|---|---|" + "---|" * len(throughput)]
        for name, t in figures["seconds"].items():
            cells = [f"{t['median']:.4g}", f"{t['min']:.4g}", f"{t['max']:.4g}"]
            cells += [_number(figures[k][name]["median"]) if name in figures[k] else "" for k in throughput]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    rows = ratio_rows(figures)
    if rows:
        lines += ["| ratio | median | min | max | ratio of medians |", "|---|---|---|---|---|"]
        lines += [f"| {name} | {r['median']:.3f} | {r['min']:.3f} | {r['max']:.3f} | "
                  f"{'' if 'of_medians' not in r else format(r['of_medians'], '.3f')} |" for name, r in rows]
        lines.append("")
    for name, why in figures.get("unavailable", {}).items():
        lines.append(f"- {name}: {why}")
    if figures.get("unavailable"):
        lines.append("")
    if module is not None and hasattr(module, "markdown"):
        lines += [*module.markdown(figures), ""]
    return lines


def markdown(results: dict, modules: dict | None = None) -> str:
    """bench.md: the run's header, each study's tables, and the targets."""
    m = results["machine"]
    header = (f"Measured {results['date']} on {m['processor']}, {m['cpu_count']} CPUs, "
              f"{(m['memory_bytes'] or 0) / 2**30:.0f} GiB, devices {', '.join(m['devices'])}; "
              f"jax {m['versions'].get('jax', '?')}, torch {m['versions'].get('torch', 'absent')}; "
              f"command: `{results['command']}`")
    lines = [header, ""]
    for suite, figures in results["suites"].items():
        load = results["load_average"].get(suite, {})
        lines += suite_markdown(suite, figures, (modules or {}).get(suite))
        lines += [(f"Load average (1, 5, 15 min) before {load.get('before')}, after {load.get('after')}; the study "
                  f"took {results['wall_seconds'].get(suite, 0):.0f} s."), ""]
    if results["targets"]:
        lines += ["| target | median | goal | met? |", "|---|---|---|---|"]
        lines += [f"| {k} | {v:.3f} | {results['target_goals'][k]['goal']} | "
                  f"{'yes' if results['target_goals'][k]['met'] else 'no'} |" for k, v in results["targets"].items()]
    return "\n".join(lines) + "\n"


def plot_suite(suite: str, figures: dict, module, out: Path) -> list[str]:
    """The study's own plot if it has one, else bars of its median seconds; file names under `out`."""
    if hasattr(module, "plot"):
        paths = module.plot(figures, out)
    elif figures.get("seconds"):
        paths = [bars(f"{suite}: {figures.get('setup') or figures.get('preset', '')}", figures["seconds"],
                      out / f"{suite}.png")]
    else:
        paths = []
    return [Path(p).name for p in paths]


def write(results: dict, modules: dict, out: Path) -> str:
    """(Re)write bench.json and bench.md; returns the markdown."""
    results["targets"], results["target_goals"] = targets(results["suites"])
    (out / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results, modules)
    (out / "bench.md").write_text(table)
    return table


def parse_settings(pairs: list[str], suites: list[str]) -> dict[str, dict[str, list[str]]]:
    """{suite: {name: [values in order]}} from `--set SUITE.NAME=VALUE` arguments; a pair that names no
    selected suite is refused (ValueError)."""
    settings: dict[str, dict[str, list[str]]] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        suite, dot, name = key.partition(".")
        if not sep or not dot or not name:
            raise EnchtableError(f"--set {pair!r}: expected SUITE.NAME=VALUE, e.g. safety.model=/path/to/model")
        if suite not in suites:
            raise EnchtableError(f"--set {pair!r}: suite {suite!r} is not among the suites run ({', '.join(suites)})")
        settings.setdefault(suite, {}).setdefault(name, []).append(value)
    return settings


def sizes_of(suite: str) -> tuple[str, ...]:
    """The sizes a study declares (`SIZES`); none for a study without, or one that cannot be imported here (the run
    records why)."""
    try:
        return tuple(getattr(importlib.import_module(SUITES[suite]), "SIZES", ()))
    except ImportError:
        return ()


def check_size(size: str | None, suites: list[str]) -> None:
    """Refuse a `--size` that no selected study knows (EnchtableError naming --size and the sizes there are)."""
    known = {suite: sizes_of(suite) for suite in suites}
    if size is not None and not any(size in sizes for sizes in known.values()):
        offered = "; ".join(f"{suite}: {', '.join(sizes)}" for suite, sizes in known.items() if sizes) or "none"
        raise EnchtableError(f"--size {size!r}: no selected study has that size (sizes: {offered})")


def run_study(module, quick: bool, repeats: int | None, out: Path, settings: dict[str, list[str]],
              size: str | None = None) -> dict:
    """The study's figures: `run(quick, repeats)`, plus `out` (its own folder), `settings` and `size` (one of its
    `SIZES`) where its `run` takes them."""
    parameters = inspect.signature(module.run).parameters
    if settings and "settings" not in parameters:
        raise EnchtableError(f"{module.__name__} takes no settings, got {', '.join(settings)}")
    extra = {"out": out, "settings": settings}
    if size in getattr(module, "SIZES", ()):
        extra["size"] = size
    return module.run(quick=quick, repeats=repeats, **{k: v for k, v in extra.items() if k in parameters})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m enchtable_jax.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--suite", action="append", choices=list(SUITES),
                        help=f"study to run (repeatable; default all but {', '.join(OPT_IN)})")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smallest sizes: a smoke run of a few minutes")
    size.add_argument("--size", metavar="NAME",
                      help="run each study that has this size (e.g. smollm2-135m) at it alone, the others as usual")
    parser.add_argument("--repeats", type=int, help="timed repeats per implementation")
    parser.add_argument("--out", default="bench-out", help="output folder (default: bench-out)")
    parser.add_argument("--set", action="append", default=[], metavar="SUITE.NAME=VALUE", dest="settings",
                        help="a setting of a study that takes settings (repeatable), e.g. safety.model=DIR, "
                             "safety.size=full, safety.prompts=FILE; see the study's module docstring")
    args = parser.parse_args(argv)
    suites = list(dict.fromkeys(args.suite or [s for s in SUITES if s not in OPT_IN]))
    try:
        settings = parse_settings(args.settings, suites)
        check_size(args.size, suites)
    except ValueError as e:
        parser.error(str(e))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
               "command": " ".join(["python -m enchtable_jax.bench", *(argv if argv is not None else sys.argv[1:])]),
               "machine": machine(), "quick": args.quick, "size": args.size, "suites": {}, "load_average": {},
               "wall_seconds": {}, "plots": {}}
    modules, failed = {}, []
    for suite in suites:
        print(f"[bench] {suite} ...", flush=True)
        before, start = load_average(), time.perf_counter()
        try:
            modules[suite] = importlib.import_module(SUITES[suite])
            figures = run_study(modules[suite], args.quick, args.repeats, out / suite, settings.get(suite, {}),
                                args.size)
            results["plots"][suite] = plot_suite(suite, figures, modules[suite], out)
        except Exception as e:  # noqa: BLE001 - one failed study must not lose the others' measurements
            missing = e.name if isinstance(e, ImportError) else None
            if missing and missing.split(".")[0] != "enchtable_jax":  # a third-party library, not our bug
                figures = {"unavailable": {suite: f"{missing} unavailable ({type(e).__name__}: {e})"}}
            else:
                traceback.print_exc()
                figures = {"error": f"{type(e).__name__}: {e}"[:2000]}
                failed.append(suite)
        results["suites"][suite] = figures
        results["load_average"][suite] = {"before": before, "after": load_average()}
        results["wall_seconds"][suite] = time.perf_counter() - start
        write(results, modules, out)
    table = write(results, modules, out)
    print(table)
    print(f"[bench] wrote {out / 'bench.json'}, {out / 'bench.md'} and "
          f"{', '.join(p for ps in results['plots'].values() for p in ps) or 'no plots'} in {out}")
    if failed:
        print(f"[bench] failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
