"""Optional comparison libraries (torch, mergekit, safetensors, neural-tangents): use them where they import.

A study that compares against a library that is missing or broken records why, as
`{"unavailable": {implementation: reason}}`, and measures the rest.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import warnings
from pathlib import Path
from types import ModuleType

BENCHMARKS_ENV = "ENCHTABLE_BENCHMARKS"
EXTRA = "pip install 'enchtable-jax[bench]'"  # the extra that brings every comparison side that installs


def optional_module(name: str) -> tuple[ModuleType | None, str | None]:
    """(module, None) when `name` imports; else (None, "<missing module> unavailable (<error>)").

    The reason names the module that failed (torch, when a reference cannot import it), since that is
    what a user would install.
    """
    try:
        with warnings.catch_warnings():  # e.g. mergekit 0.1.5 touches the deprecated numpy.core on import
            warnings.simplefilter("ignore", DeprecationWarning)
            return importlib.import_module(name), None
    except Exception as e:  # noqa: BLE001 - any failure to import means the comparison cannot run here
        return None, _reason(e, name)


def _reason(error: Exception, name: str) -> str:
    first = str(error).splitlines()[0] if str(error) else ""
    missing = (getattr(error, "name", None) or name).split(".")[0]
    hint = f"; {EXTRA}" if isinstance(error, ModuleNotFoundError) and missing in ("torch", "mergekit") else ""
    return f"{missing} unavailable ({type(error).__name__}: {first}{hint})"


def benchmarks_dir() -> Path:
    """The repository's `benchmarks/` folder, home of the PyTorch references: $ENCHTABLE_BENCHMARKS, else the
    folder beside the installed package (a source checkout or an editable install)."""
    return Path(os.environ.get(BENCHMARKS_ENV) or Path(__file__).resolve().parents[2] / "benchmarks")


def reference_module(name: str) -> tuple[ModuleType | None, str | None]:
    """The PyTorch reference `benchmarks/<name>.py`, loaded by path: (module, None) or (None, why not).

    The references are plain scripts of the repository, not part of the installed package; a wheel
    install has no `benchmarks/` folder, and the studies then record the comparison as unavailable.
    """
    path = benchmarks_dir() / f"{name}.py"
    key = f"enchtable_benchmarks.{name}"
    if key in sys.modules:
        return sys.modules[key], None
    if not path.is_file():
        return None, (f"{name} unavailable (no {path}: the PyTorch references live in the repository's benchmarks/ "
                      f"folder; run from a source checkout or set {BENCHMARKS_ENV} to that folder)")
    spec = importlib.util.spec_from_file_location(key, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module  # before running it, as an import would (dataclasses look themselves up there)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - e.g. torch not installed
        del sys.modules[key]
        return None, _reason(e, name)
    return module, None
