"""Measurements that need a fresh Python process: peak memory, and JAX with a chosen device count.

A process's peak RSS is a maximum over its whole life, and JAX fixes its device count when it starts,
so both are measured in a child that does one thing. Linux keeps `ru_maxrss` across fork and exec (a
child of the large bench process would report at least the parent's size), so the child reads its own
high-water mark, VmHWM, from /proc/self/status where that exists.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping

# Defined in every child: peak_rss_bytes() and ARGS (the JSON arguments); the child prints one JSON line.
PRELUDE = '''
import json, resource, sys


def peak_rss_bytes():
    """This process's peak resident set size in bytes (VmHWM; ru_maxrss where /proc is absent)."""
    try:
        with open("/proc/self/status") as f:
            return 1024 * next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
        return scale * resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


ARGS = json.loads(sys.argv[1])
'''

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def run_fresh(code: str, args: Mapping, env: Mapping[str, str] | None = None, timeout: float | None = None) -> dict:
    """Run `code` (after `PRELUDE`) in a fresh interpreter and return the JSON object it prints last.

    `env` entries are added to (or replace) this process's environment.
    """
    done = subprocess.run([sys.executable, "-c", PRELUDE + code, json.dumps(dict(args))], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"fresh process failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"fresh process printed no JSON result:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return json.loads(lines[-1])


def cpu_devices_env(count: int) -> dict[str, str]:
    """XLA_FLAGS for a child JAX process with `count` simulated CPU devices (other flags kept)."""
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_COUNT_FLAG)]
    return {"XLA_FLAGS": " ".join([*kept, f"{DEVICE_COUNT_FLAG}={count}"])}
