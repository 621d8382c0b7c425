"""The element-wise methods' host forms (task arithmetic, Model Stock): the executor's numpy path, chunk by chunk
and fused with the reads, against the method's own JAX function on each whole tensor, on tensors that span several
chunks (the tiny models of test_merge.py fit in one), in float32 and bfloat16; and a NaN in a later chunk is still
refused, naming the tensor. Merged into memory and into a folder, where the host forms write each chunk straight
into the output file (`HFWriter.sink`) instead of handing the writer whole arrays."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from enchtable_jax.converters.hf import HFWriter
from enchtable_jax.merging import executor
from enchtable_jax.merging.executor import tensor_key
from enchtable_jax.merging.methods import METHODS
from enchtable_jax.merging.pipeline import merge
from enchtable_jax.models import init_params, preset_config
from enchtable_jax.models.model import Model
from enchtable_jax.nonfinite import NonFiniteError

ALPHA = 0.7
# The embedding, 4103 × 32 = 131,296 entries: two whole chunks and a part of a third.
CONFIG = preset_config("tiny", num_hidden_layers=1, hidden_size=32, intermediate_size=48,
                       vocab_size=2 * executor._HOST_CHUNK // 32 + 7)
EMBED = "model.embed_tokens.weight"


def _models(dtype, nan_in_task: bool = False) -> dict[str, Model]:
    """base; task = base + noise; aligned = base + other noise; harmful = base: every tensor is merged."""
    base = {n: np.asarray(v, np.float32) for n, v in init_params(CONFIG, seed=0, std=0.1).items()}
    rng = np.random.default_rng(1)
    roles = {"base": base, "harmful": base,
             "task": {n: v + 0.02 * rng.standard_normal(v.shape, np.float32) for n, v in base.items()},
             "aligned": {n: v + 0.03 * rng.standard_normal(v.shape, np.float32) for n, v in base.items()}}
    if nan_in_task:
        roles["task"][EMBED][-1, -1] = np.nan
    return {role: Model(CONFIG, {n: jnp.asarray(v, dtype) for n, v in params.items()})
            for role, params in roles.items()}


@pytest.mark.parametrize("folder", [False, True], ids=["memory", "folder"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("method", ["task_arithmetic", "model_stock"])
def test_host_form_equals_the_method_on_whole_tensors(method, dtype, folder, tmp_path, monkeypatch):
    assert METHODS[method].host is not None
    models = _models(dtype)
    handed = []  # tensors the writer got as whole arrays
    real_add = HFWriter.add
    monkeypatch.setattr(HFWriter, "add", lambda self, name, array: (handed.append(name), real_add(self, name, array)))
    result = merge(method, models["base"], models["task"], aligned=models["aligned"], harmful=models["harmful"],
                   alpha=ALPHA, progress=False, out=tmp_path / "out" if folder else None, load_model=folder)
    assert handed == []
    weights = {t["name"]: t["weight"] for t in result.report["tensors"]}
    assert len(weights) == len(models["task"].params) and result.report["merged"] == len(weights)
    for name, task in models["task"].params.items():
        b = jnp.asarray(models["base"].params[name], jnp.float32)
        safety = jnp.asarray(models["aligned"].params[name], jnp.float32) - b  # harmful = base
        delta, stats = METHODS[method].fn(jnp.asarray(task, jnp.float32) - b, safety, jnp.float32(ALPHA),
                                          jax.random.wrap_key_data(tensor_key(0, name)))
        want = np.asarray((b + delta).astype(dtype), np.float32)
        got = np.asarray(result.model.params[name], np.float32)
        assert result.model.params[name].dtype == dtype
        if method == "task_arithmetic":  # the same float32 operations in the same order: the same bytes
            np.testing.assert_array_equal(got, want, err_msg=name)
        else:  # Model Stock's t from float64 sums here, float32 reductions there; bfloat16 may round the other way
            np.testing.assert_allclose(got, want, rtol=2e-6 if dtype == jnp.float32 else 2**-8, atol=1e-7,
                                       err_msg=name)
        assert weights[name] == pytest.approx(float(stats["weight"]), rel=1e-6), name


@pytest.mark.parametrize("folder", [False, True], ids=["memory", "folder"])
def test_host_form_refuses_a_nan_in_a_later_chunk(folder, tmp_path):
    models = _models(jnp.float32, nan_in_task=True)
    with pytest.raises(NonFiniteError, match=f"task model \\(in memory\\): tensor {EMBED} holds 1 NaN .*refusing"):
        merge("task_arithmetic", models["base"], models["task"], aligned=models["aligned"],
              harmful=models["harmful"], alpha=ALPHA, progress=False, out=tmp_path / "out" if folder else None)
    assert list(tmp_path.iterdir()) == []  # nothing written, no staging folder left
