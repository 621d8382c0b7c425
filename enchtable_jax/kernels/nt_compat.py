"""Import neural-tangents 0.6.5 (its latest release, 2023) on current JAX.

Its import fails on JAX >= 0.7 for two reasons, both outside the code this project calls:
- `neural_tangents/__init__.py` imports `experimental`, its TensorFlow bridge (`empirical_ntk_fn_tf`), which
  imports `jax.experimental.jax2tf` (tensorflow) and `tf2jax`. We never use it, and its tensorflow/tf2jax
  requirements are why neural-tangents is installed with `pip install --no-deps` (README, `ntk` extra).
- names JAX removed from its public modules, read once at import:
  `from jax.core import Jaxpr, JaxprEqn, Literal, Var, Primitive` (empirical.py, utils/rules.py; now in
  `jax.extend.core`), `from jax.util import safe_map, safe_zip` (empirical.py; the module `jax.util` is gone,
  the functions live in `jax._src.util`), and `jax.interpreters.ad.zeros_like_p` (utils/rules.py keys a rule
  table by it; now `jax._src.ad_util.zeros_like_p`).

`import_neural_tangents` puts each missing name back, as the very object JAX still has under its new address,
imports the package with `experimental` replaced by a module that explains itself, then removes what it added:
after the call JAX is as it was, and only neural-tangents' own modules hold the names.

What then works: `empirical_ntk_fn` with `NtkImplementation.JACOBIAN_CONTRACTION` (its default) and
`NTK_VECTOR_PRODUCTS`, which use public JAX transformations only. `STRUCTURED_DERIVATIVES` rewrites jaxprs
with JAX internals that changed since (on JAX 0.10: `TypeError: linearize() got multiple values for argument
'has_aux'`) and is not supported here.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
import types
from collections.abc import Iterator

import jax
import jax.core
import jax.extend.core
import jax.interpreters.ad

EXPERIMENTAL = "neural_tangents.experimental"


def _restorations() -> list[tuple[object, str, object]]:
    """(owner, name, value) for each name neural-tangents imports that this JAX lacks."""
    from jax._src import ad_util, util  # private on purpose: the only addresses these objects still have

    wanted = [(jax.core, name, getattr(jax.extend.core, name)) for name in ("Jaxpr", "JaxprEqn", "Literal", "Var",
                                                                            "Primitive")]
    wanted.append((jax.interpreters.ad, "zeros_like_p", ad_util.zeros_like_p))
    restored = [(owner, name, value) for owner, name, value in wanted if not hasattr(owner, name)]
    if importlib.util.find_spec("jax.util") is None and "jax.util" not in sys.modules:
        jax_util = types.ModuleType("jax.util", "safe_map and safe_zip for neural-tangents (kernels/nt_compat.py)")
        jax_util.safe_map, jax_util.safe_zip = util.safe_map, util.safe_zip
        restored.append((sys.modules, "jax.util", jax_util))
    return restored


def _experimental_stub() -> types.ModuleType:
    """Stands in for neural_tangents.experimental (its TensorFlow bridge): any attribute raises ImportError."""
    stub = types.ModuleType(EXPERIMENTAL, "neural-tangents' TensorFlow bridge, not loaded (kernels/nt_compat.py)")

    def __getattr__(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        raise ImportError(f"{EXPERIMENTAL}.{name} is not available: enchtable_jax imports neural-tangents without its "
                          "TensorFlow bridge (jax2tf, tf2jax); see enchtable_jax/kernels/nt_compat.py")

    stub.__getattr__ = __getattr__
    return stub


@contextlib.contextmanager
def _restored(restorations: list[tuple[object, str, object]]) -> Iterator[None]:
    for owner, name, value in restorations:
        if isinstance(owner, dict):
            owner[name] = value
        else:
            setattr(owner, name, value)
    try:
        yield
    finally:
        for owner, name, _ in restorations:
            if isinstance(owner, dict):
                owner.pop(name, None)
            else:
                delattr(owner, name)


def import_neural_tangents() -> types.ModuleType:
    """The `neural_tangents` module, imported with the JAX names it needs present only while it imports.

    Raises ModuleNotFoundError when it is not installed, and whatever its import raises otherwise.
    """
    if "neural_tangents" in sys.modules:
        return sys.modules["neural_tangents"]
    if importlib.util.find_spec("neural_tangents") is None:
        raise ModuleNotFoundError("No module named 'neural_tangents'", name="neural_tangents")
    sys.modules[EXPERIMENTAL] = _experimental_stub()
    try:
        with _restored(_restorations()):
            return importlib.import_module("neural_tangents")
    except BaseException:
        for name in [n for n in sys.modules if n == "neural_tangents" or n.startswith("neural_tangents.")]:
            del sys.modules[name]  # a failed import leaves no half-imported package behind
        raise


__all__ = ["import_neural_tangents"]
