"""kernels/nt_compat.py: neural-tangents 0.6.5 imports on this JAX, its modules hold the very objects JAX keeps
under new addresses, and JAX is left without the names once the import is done."""

import importlib.util
import sys

import jax
import jax.core
import jax.extend.core
import jax.interpreters.ad
import pytest
from jax._src import ad_util, util

from enchtable_jax.kernels import nt_compat

needs_nt = pytest.mark.skipif(importlib.util.find_spec("neural_tangents") is None,
                              reason="neural-tangents is not installed (pip install --no-deps neural-tangents==0.6.5)")
CORE = ("Jaxpr", "JaxprEqn", "Literal", "Var", "Primitive")


def _state():
    return ({n: hasattr(jax.core, n) for n in CORE}, hasattr(jax.interpreters.ad, "zeros_like_p"),
            "jax.util" in sys.modules)


def test_names_exist_only_while_restored():
    before = _state()
    restorations = nt_compat._restorations()
    with nt_compat._restored(restorations):
        for name in CORE:
            assert getattr(jax.core, name) is getattr(jax.extend.core, name)
        assert jax.interpreters.ad.zeros_like_p is ad_util.zeros_like_p
        from jax.util import safe_map, safe_zip
        assert (safe_map, safe_zip) == (util.safe_map, util.safe_zip)
    assert _state() == before
    assert {name for _, name, _ in restorations} <= {*CORE, "zeros_like_p", "jax.util"}


@needs_nt
def test_neural_tangents_imports_with_jax_objects_and_jax_untouched():
    before = _state()
    nt = nt_compat.import_neural_tangents()
    assert _state() == before
    assert nt.__version__ == "0.6.5"
    empirical = sys.modules["neural_tangents._src.empirical"]
    assert empirical.Jaxpr is jax.extend.core.Jaxpr and empirical.map is util.safe_map
    assert nt_compat.import_neural_tangents() is nt


@needs_nt
def test_tensorflow_bridge_explains_itself():
    nt = nt_compat.import_neural_tangents()
    with pytest.raises(ImportError, match="empirical_ntk_fn_tf is not available.*TensorFlow bridge"):
        nt.experimental.empirical_ntk_fn_tf
