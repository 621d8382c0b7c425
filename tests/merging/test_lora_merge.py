"""A merge whose task model is a PEFT LoRA adapter over the base, against the same merge of the model PEFT's
merge_and_unload makes of it (the oracle): equal α, interference, weights and merged tensors within float32
tolerance, through the Python API and the CLI."""

from __future__ import annotations

import json
import shutil

import chex
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

import enchtable_jax as ej
from enchtable_jax.calibration import EnchtableSweep
from enchtable_jax.cli import main
from enchtable_jax.merging import executor
from enchtable_jax.merging.methods import method_options
from enchtable_jax.merging.pipeline import merge
from enchtable_jax.merging.sources import SafetyDelta
from enchtable_jax.nonfinite import NonFiniteError
from lora_models import CONFIGS, make_adapter


@pytest.fixture(scope="module")
def lora_world(tmp_path_factory):
    """base, adapter (on every projection, ranks 2, 3 and 4 by rank_pattern: same-shaped tensors of different ranks;
    and on the embeddings and head, which the safety delta does not cover: copied as base + delta), PEFT's merged
    model (dense) and a harmful model (base + noise on the decoder matrices) as folders."""
    root = tmp_path_factory.mktemp("lora")
    config = CONFIGS["patterns"]
    base, adapter, dense, _ = make_adapter(root, **{**config, "target_modules": [*config["target_modules"],
                                                                                  "embed_tokens", "lm_head"]})
    model = ej.load(base)
    rng = np.random.default_rng(3)
    harmful = {n: np.asarray(v) + (0.05 * rng.standard_normal(v.shape, np.float32) if ".layers." in n and v.ndim == 2
                                   else 0) for n, v in model.params.items()}
    ej.save(ej.Model(model.config, {n: jnp.asarray(v) for n, v in harmful.items()}), root / "harmful", progress=False)
    return {"base": base, "adapter": adapter, "dense": dense, "harmful": root / "harmful"}


def _merge(world, task: str, method: str, **kw):
    return merge(method, world["base"], world[task], aligned=world["base"], harmful=world["harmful"], progress=False,
                 **kw)


@pytest.fixture(scope="module")
def dense_enchtable(lora_world):
    """The oracle: EnchTable's merge of the model PEFT merged."""
    return _merge(lora_world, "dense", "enchtable")


def _stats(report) -> dict[str, tuple]:
    return {t["name"]: (t.get("interference"), t.get("weight")) for t in report["tensors"] if t["merged"]}


@pytest.mark.parametrize("method", ["enchtable", pytest.param("ties", marks=pytest.mark.slow), "tsv"])
def test_adapter_merge_equals_the_merge_of_peft_merged_model(lora_world, dense_enchtable, method):
    options = {} if method == "enchtable" else {"alpha": 0.7}
    lora = _merge(lora_world, "adapter", method, **options)
    dense = dense_enchtable if method == "enchtable" else _merge(lora_world, "dense", method, **options)
    assert lora.report["alpha"] == pytest.approx(dense.report["alpha"], rel=1e-6)
    assert lora.report["merged"] == dense.report["merged"] > 0
    ours, theirs = _stats(lora.report), _stats(dense.report)
    assert ours.keys() == theirs.keys()
    for name, (iota, weight) in ours.items():
        if method == "enchtable":
            assert iota == pytest.approx(theirs[name][0], rel=1e-4, abs=1e-6), name
            assert weight == pytest.approx(theirs[name][1], rel=1e-5), name
    for name, array in lora.model.params.items():
        np.testing.assert_allclose(np.asarray(array), np.asarray(dense.model.params[name]), rtol=1e-5, atol=2e-6,
                                   err_msg=name)


@pytest.mark.parametrize("chunk", [200, 50])  # whole rows per step, the last step short; a row over the scratch
def test_host_forms_take_tau_task_from_the_factors_row_blocks(lora_world, dense_enchtable, tmp_path, monkeypatch,
                                                              chunk):
    """The host forms (EnchTable's weighted deltas into the output file, task arithmetic into arrays) build τ_task
    from the factors a block of rows at a time: equal to the merge of PEFT's merged model at any step size."""
    dense_sum = _merge(lora_world, "dense", "task_arithmetic", alpha=0.7).model.params
    monkeypatch.setattr(executor, "_HOST_CHUNK", chunk)
    _merge(lora_world, "adapter", "enchtable", out=tmp_path / "merged")
    runs = {"enchtable": (ej.load(tmp_path / "merged").params, dense_enchtable.model.params),
            "task_arithmetic": (_merge(lora_world, "adapter", "task_arithmetic", alpha=0.7).model.params, dense_sum)}
    for method, (ours, theirs) in runs.items():
        for name, array in ours.items():
            np.testing.assert_allclose(np.asarray(array), np.asarray(theirs[name]), rtol=1e-5, atol=2e-6,
                                       err_msg=f"{method} {name}")


def test_cli_merge_with_an_adapter_as_the_task(lora_world, dense_enchtable, tmp_path):
    out = tmp_path / "merged"
    assert main(["merge", "--method", "enchtable", "--base", str(lora_world["base"]), "--task",
                 str(lora_world["adapter"]), "--aligned", str(lora_world["base"]), "--harmful",
                 str(lora_world["harmful"]), "--out", str(out)]) == 0
    report = json.loads((out / "merge_report.json").read_text())
    assert report["alpha"] == pytest.approx(dense_enchtable.report["alpha"], rel=1e-6)
    assert not (out / "adapter_config.json").exists()  # the base's companion files, not the adapter's
    assert (out / "generation_config.json").exists()
    for name, array in ej.load(out).params.items():
        np.testing.assert_allclose(np.asarray(array), np.asarray(dense_enchtable.model.params[name]), rtol=1e-5,
                                   atol=2e-6, err_msg=name)


def test_calibration_sweep_reads_an_adapter(lora_world):
    """`merge --calibrate` with an adapter: the β sweep's model equals the merge at that β."""
    safety = SafetyDelta(None, lora_world["base"], lora_world["harmful"])
    sweep = EnchtableSweep(lora_world["base"], lora_world["adapter"], safety, method_options("enchtable", {}))
    want = _merge(lora_world, "adapter", "enchtable", beta=0.3).model
    chex.assert_trees_all_close(sweep.model(0.3).params, want.params, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method, options", [("enchtable", {}), ("ties", {"alpha": 0.7})])
def test_nonfinite_factor_refused_naming_the_adapter_file(lora_world, tmp_path, method, options):
    """A NaN in a factor is found by α's norms (adaptive) or by the merge's guard (fixed α), and named."""
    adapter = tmp_path / "adapter"
    shutil.copytree(lora_world["adapter"], adapter)
    tensors = safetensors.numpy.load_file(adapter / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"][3, 1] = np.nan
    safetensors.numpy.save_file(tensors, adapter / "adapter_model.safetensors")
    with pytest.raises(NonFiniteError, match=r"task adapter .*adapter_model.safetensors: tensor "
                                             r"model.layers.1.mlp.up_proj.weight holds"):
        _merge({**lora_world, "broken": adapter}, "broken", method, **options)
