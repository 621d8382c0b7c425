"""Optional comparison libraries (torch, mergekit, safetensors, neural-tangents): use them where they import.

A study that compares against a library that is missing or broken records why, as
`{"unavailable": {implementation: reason}}`, and measures the rest.
"""

from __future__ import annotations

import importlib
import warnings
from types import ModuleType


def optional_module(name: str) -> tuple[ModuleType | None, str | None]:
    """(module, None) when `name` imports; else (None, "<missing module> unavailable (<error>)").

    The reason names the module that failed (torch, when `enchtable_jax.bench.torch_reference` cannot
    import it), since that is what a user would install.
    """
    try:
        with warnings.catch_warnings():  # e.g. mergekit 0.1.5 touches the deprecated numpy.core on import
            warnings.simplefilter("ignore", DeprecationWarning)
            return importlib.import_module(name), None
    except Exception as e:  # noqa: BLE001 - any failure to import means the comparison cannot run here
        first = str(e).splitlines()[0] if str(e) else ""
        missing = getattr(e, "name", None) or name
        return None, f"{missing.split('.')[0]} unavailable ({type(e).__name__}: {first})"
