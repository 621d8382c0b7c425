"""The non-finite guard: no NaN or Inf goes into a computation unnoticed, and none comes out at all.

One NaN in one weight poisons a merge (the adaptive α, and through it every merged tensor) and a distillation
(every gradient); the result still looks like a model. So inputs are refused naming the file and the tensor
(`allow_nonfinite=True` / `--allow-nonfinite` lets them through, for the rare model that stores an Inf on
purpose), and every output tensor is checked before the output folder is renamed into place, always.

The checks are one pass over memory that is already there: numpy on host buffers (`np.isfinite(x).all()`
for float32/64, the exponent bits of the raw 16-bit words for float16/bfloat16, about 0.2 ns an entry),
or a fused `isfinite` reduction on the device that holds the tensor.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from enchtable_jax.errors import EnchtableError

ALLOW_HINT = "pass allow_nonfinite=True (--allow-nonfinite) to use it anyway; the output is still checked"

# Exponent masks of the 16-bit floats: all exponent bits set means Inf or NaN.
_EXPONENT_16 = {"float16": 0x7C00, "bfloat16": 0x7F80}


class NonFiniteError(EnchtableError):
    """A tensor holds NaN or Inf: an input that would poison the result, or a result that is not a model."""


def host_finite(arr: np.ndarray) -> bool:
    """Whether every entry of a host array is finite (integers and booleans always are)."""
    arr = np.asarray(arr)
    if arr.dtype.kind in "biu":
        return True
    if arr.dtype in (np.float32, np.float64):
        return bool(np.isfinite(arr).all())
    mask = _EXPONENT_16.get(arr.dtype.name)
    if mask is not None:  # ml_dtypes' bfloat16 ufuncs are not vectorized: look at the bits instead
        bits = np.ascontiguousarray(arr).view(np.uint16)
        return not bool(np.any((bits & mask) == mask))
    return bool(np.isfinite(arr.astype(np.float32)).all())


@jax.jit
def _all_finite(tree):
    return {k: jnp.all(jnp.isfinite(v)) if jnp.issubdtype(v.dtype, jnp.inexact) else jnp.bool_(True)
            for k, v in tree.items()}


def device_finite(params: Mapping[str, Any]) -> dict[str, bool]:
    """{name: finite?} of arrays already on devices: one fused reduction each, where the tensor is."""
    on_device = {k: v for k, v in params.items() if isinstance(v, jax.Array)}
    result = {k: bool(v) for k, v in jax.device_get(_all_finite(on_device)).items()} if on_device else {}
    for k, v in params.items():
        if k not in result:
            result[k] = host_finite(np.asarray(v))
    return result


def describe(arr: Any) -> str:
    """'2 NaN and 1 Inf among 4096 values, the first at index (0, 3)' (the slow path: only after a failed check)."""
    x = np.asarray(jax.device_get(arr))
    if x.dtype.kind not in "fc":
        x = x.astype(np.float32)
    nan, inf = np.isnan(x), np.isinf(x)
    bad = np.argwhere(nan | inf)
    first = f", the first at index {tuple(int(i) for i in bad[0])}" if len(bad) else ""
    return f"{int(nan.sum())} NaN and {int(inf.sum())} Inf among {x.size} values{first}"


def input_error(where: Any, name: str, arr: Any, hint: str = ALLOW_HINT) -> NonFiniteError:
    """The error for a non-finite input tensor `name` of file (or model) `where`."""
    return NonFiniteError(f"{where}: tensor {name} holds {describe(arr)}; refusing a non-finite input ({hint})")


def check_input(arr: np.ndarray, where: Any, name: str, allow: bool = False) -> np.ndarray:
    """`arr` if it is finite (or `allow`), else a NonFiniteError naming `where` and `name`."""
    if not allow and not host_finite(arr):
        raise input_error(where, name, arr)
    return arr


def check_params(params: Mapping[str, Any], where: Any, allow: bool = False) -> None:
    """Refuse a model (a dict of device or host arrays) with a non-finite tensor, naming the first one."""
    if allow:
        return
    for name, finite in device_finite(params).items():
        if not finite:
            raise input_error(where, name, params[name])


def output_error(what: str, name: str, arr: Any, why: str = "") -> NonFiniteError:
    return NonFiniteError(f"{what}: tensor {name} would hold {describe(arr)}; nothing was written{why}")


def check_output(arr: np.ndarray, what: str, name: str, why: str = "") -> np.ndarray:
    """`arr` if it is finite, else a NonFiniteError: an output is never written with NaN or Inf."""
    if not host_finite(arr):
        raise output_error(what, name, arr, why)
    return arr
