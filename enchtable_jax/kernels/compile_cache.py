"""JAX's persistent compilation cache in a user cache folder, so that a shape compiles once per machine.

On TPUs the SVD is a QDWH polar decomposition that XLA compiles per shape, and compiling a 4096² one has taken over
ten minutes (jax issue 28315): every merge of an 8B model would pay that again. With the cache, compiled programs
that took over `jax_persistent_cache_min_compile_time_secs` (1 s by default) are written to disk and later processes
load them. It is process-wide JAX state, so the package turns it on by itself only where the TPU runtime (libtpu) is
installed, and never over a cache folder the user chose; elsewhere `use_compilation_cache()` asks for it. It must
happen before JAX's first compilation (JAX decides once per process whether to use the cache).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import jax


def cache_root() -> Path:
    """$XDG_CACHE_HOME/enchtable-jax (default ~/.cache/enchtable-jax): the package's per-machine caches."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "enchtable-jax"


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/enchtable-jax/jax-compilation-cache (default ~/.cache/...)."""
    return cache_root() / "jax-compilation-cache"


def use_compilation_cache(path: str | os.PathLike | None = None) -> Path | None:
    """Point JAX's persistent compilation cache at `path` (default `default_cache_dir()`), unless a cache folder is
    already set (JAX_COMPILATION_CACHE_DIR or jax_compilation_cache_dir); returns the folder now in use, or None when
    a folder set before is kept. Call it before the first JAX computation of the process."""
    if jax.config.jax_compilation_cache_dir:
        return None
    folder = Path(path) if path is not None else default_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    return folder


def tpu_runtime_installed() -> bool:
    """Whether libtpu, the TPU runtime JAX loads, is installed (known without starting JAX's backends)."""
    return importlib.util.find_spec("libtpu") is not None


def use_compilation_cache_on_tpu() -> Path | None:
    """`use_compilation_cache()` where the TPU runtime is installed; elsewhere nothing (returns None)."""
    return use_compilation_cache() if tpu_runtime_installed() else None


__all__ = ["cache_root", "default_cache_dir", "tpu_runtime_installed", "use_compilation_cache",
           "use_compilation_cache_on_tpu"]
