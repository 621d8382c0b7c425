"""Re-measure the merge study's cold-process figures (seconds, peak RSS) after a fix, without the in-process
repeats: builds the study's synthetic folders per size and runs each implementation once in a fresh process.

Usage: XLA_FLAGS=--xla_force_host_platform_device_count=2 python benchmarks/merge_cold_recheck.py OUT.json
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import tempfile
from pathlib import Path

from enchtable_jax.bench.process import run_fresh
from enchtable_jax.bench.studies.merge import _OURS, _TORCH, build_world, floor_memory


def main(out: str) -> None:
    torch_merge = Path(__file__).with_name("torch_merge.py")
    results = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "command": f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')} python benchmarks/merge_cold_recheck.py {out}",
               "sizes": {}}
    for preset in ("smollm2-135m", "llama3-8b-layer"):
        with tempfile.TemporaryDirectory(prefix=f"merge-cold-{preset}-") as tmp:
            world = build_world(Path(tmp), preset)
            args = {"base": str(world["base"]), "task": str(world["task"]), "vector": str(world["vector"])}
            load = [os.getloadavg()[0]]
            ours = run_fresh(_OURS, {**args, "out": str(Path(tmp) / "out-ours")})
            torch = run_fresh(_TORCH, {**args, "out": str(Path(tmp) / "out-torch"), "module": str(torch_merge)})
            load.append(os.getloadavg()[0])
            floor = floor_memory(world, int(os.environ.get("XLA_FLAGS", "=1").rsplit("=", 1)[-1]))
            results["sizes"][preset] = {"ours": ours, "torch": torch, "load_average_1min_before_after": load,
                                        "speedup_vs_torch": torch["seconds"] / ours["seconds"],
                                        "peak_rss_over_floor": ours["peak_rss_bytes"] / floor["floor_bytes"],
                                        "floor": floor}
            print(preset, json.dumps(results["sizes"][preset]), flush=True)
    Path(out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
