"""Measurements that need a fresh Python process: peak memory, JAX with a chosen device count, and one side of a
comparison timed apart from the other (`Worker`).

A process's peak RSS is a maximum over its whole life, and JAX fixes its device count when it starts,
so both are measured in a child that does one thing. Linux keeps `ru_maxrss` across fork and exec (a
child of the large bench process would report at least the parent's size), so the child reads its own
high-water mark, VmHWM, from /proc/self/status where that exists.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

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


def read_through(paths: Iterable[Path], chunk: int = 16 << 20) -> int:
    """Read every file at or under `paths` once, into one reused buffer, so that its pages are in the page cache;
    returns the bytes read."""
    buffer, total = bytearray(chunk), 0
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*"))) if f.is_file()]
    for file in files:
        with open(file, "rb", buffering=0) as f:
            while read := f.readinto(buffer):
                total += read
    return total


class Worker:
    """One side of a comparison in a spawned process of its own: `factory(*args)` (an importable function) builds
    there the {name: call} it serves. `runner(name)` gives a call that runs one of them in the child, which reads its
    `inputs` through (files or folders: `read_through`) and then times the call, syncs the disk outside its time (so
    that its output's write-back cannot land in the other side's next call) and answers with the seconds, appended
    to `seconds[name]`. Nothing is shared with this process or another side: in one process, torch's worker threads
    outlive its calls and slow the next call of JAX, and the reverse.
    Why `inputs`: every call then starts with its inputs in the page cache, as the studies say they measure. The
    2-core VM of BENCHMARKS.md pages out page cache left unread for a minute (a DAMON pageout scheme), so a call
    that followed the other side's long ones read some of its inputs from disk again: a LoRA merge took 1.2-1.4 s
    instead of 0.7 s that way, a first merge 8.6-9.4 s instead of 7.3-8.0 s."""

    def __init__(self, side: str, factory: Callable[..., Mapping[str, Callable[[], object]]], *args,
                 inputs: Sequence[Path] = ()):
        context = multiprocessing.get_context("spawn")
        self.side, (self._conn, child) = side, context.Pipe()
        self._process = context.Process(target=_serve, args=(child, factory, args, tuple(inputs)), daemon=True)
        self._process.start()
        child.close()
        self.seconds: dict[str, list[float]] = {}

    def runner(self, name: str) -> Callable[[], None]:
        """A call that runs `name` in the child and appends the seconds it measured to `seconds[name]`; a failure
        there is raised here with the child's traceback."""

        def call() -> None:
            self._conn.send(name)
            got = self._conn.recv()
            if isinstance(got, tuple):
                raise RuntimeError(f"the {self.side} side failed in its process:\n{got[1]}")
            self.seconds.setdefault(name, []).append(got)

        return call

    def close(self) -> None:
        if self._process.is_alive():
            with contextlib.suppress(OSError):  # a child that failed has gone, and its end of the pipe with it
                self._conn.send(None)
        self._process.join(60)
        if self._process.is_alive():
            self._process.kill()


def _serve(conn, factory: Callable[..., Mapping[str, Callable[[], object]]], args: tuple,
           inputs: tuple[Path, ...]) -> None:
    """A `Worker` child's loop: on each name read the inputs through, run that call, time it, sync the disk and
    answer with the seconds, or with ("error", traceback); None ends it."""
    try:
        calls = factory(*args)
        while (name := conn.recv()) is not None:
            read_through(inputs)
            start = time.perf_counter()
            calls[name]()
            seconds = time.perf_counter() - start
            os.sync()
            conn.send(seconds)
    except Exception:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("error", traceback.format_exc()))
