"""`python -m enchtable_jax.bench [--suite NAME ...] [--quick] [--out DIR]`: run performance studies.

Writes `bench.json` (machine, versions, every figure as min/median/max over repeats, and `targets`)
and `bench.md` (a table for BENCHMARKS.md) into DIR.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.metadata
import json
import os
import platform
import sys
from pathlib import Path

import jax

SUITES = {"linearize": "enchtable_jax.bench.studies.linearize", "distill": "enchtable_jax.bench.studies.distill",
          "merge": "enchtable_jax.bench.studies.merge"}
# target name -> (suite, figure key): the medians reported in bench.json's `targets`.
TARGETS = {
    "linearized_over_plain": ("linearize", "linearized_over_plain"),
    "linearized_speedup_vs_torch": ("linearize", "linearized_speedup_vs_torch"),
    "merge_speedup_vs_torch": ("merge", "merge_speedup_vs_torch"),
    "merge_peak_rss_over_floor": ("merge", "merge_peak_rss_over_floor"),
}


def machine() -> dict:
    """What the numbers were measured on."""
    versions = {}
    for package in ("jax", "jaxlib", "optax", "torch", "numpy"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "devices": [str(d) for d in jax.devices()], "versions": versions}


def markdown(results: dict) -> str:
    """A table per suite: implementation, median seconds, tokens/s, and the ratios."""
    lines = [f"Measured {results['date']} on {results['machine']['processor']}, {results['machine']['cpu_count']} "
             f"CPUs, devices {', '.join(results['machine']['devices'])}; command: `{results['command']}`", ""]
    for suite, figures in results["suites"].items():
        lines += [f"### {suite} ({figures.get('preset', '')}, batch {figures.get('batch', '')}, "
                  f"scope {figures.get('scope', '')}, {figures.get('repeats', '')} repeats)", "",
                  "| implementation | median s | min s | max s | tokens/s (median) |", "|---|---|---|---|---|"]
        for name, t in figures["seconds"].items():
            tps = figures.get("tokens_per_second", {}).get(name, {}).get("median")
            lines.append(f"| {name} | {t['median']:.4f} | {t['min']:.4f} | {t['max']:.4f} | "
                         f"{'' if tps is None else f'{tps:,.0f}'} |")
        lines.append("")
    if results["targets"]:
        lines += ["| target | median |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in results["targets"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m enchtable_jax.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--suite", action="append", choices=list(SUITES), help="study to run (repeatable; default all)")
    parser.add_argument("--quick", action="store_true", help="smallest sizes: a smoke run in well under 3 minutes")
    parser.add_argument("--repeats", type=int, help="timed repeats per implementation")
    parser.add_argument("--out", default="bench-out", help="output folder (default: bench-out)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "command": " ".join(["python -m enchtable_jax.bench", *(argv if argv is not None else sys.argv[1:])]),
               "machine": machine(), "quick": args.quick, "suites": {}}
    for suite in args.suite or list(SUITES):
        print(f"[bench] {suite} ...", flush=True)
        results["suites"][suite] = importlib.import_module(SUITES[suite]).run(quick=args.quick, repeats=args.repeats)
    results["targets"] = {name: results["suites"][suite][key]["median"] for name, (suite, key) in TARGETS.items()
                          if suite in results["suites"] and key in results["suites"][suite]}
    (out / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    (out / "bench.md").write_text(table)
    print(table)
    print(f"[bench] wrote {out / 'bench.json'} and {out / 'bench.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
