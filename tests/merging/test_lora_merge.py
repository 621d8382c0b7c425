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
import safetensors
import safetensors.numpy

import enchtable_jax as ej
from enchtable_jax.calibration import EnchtableSweep
from enchtable_jax.cli import main
from enchtable_jax.converters.safety_vector import write_vector
from enchtable_jax.merging import decomposition, executor
from enchtable_jax.merging.methods import method_options
from enchtable_jax.merging.pipeline import merge
from enchtable_jax.merging.sources import SafetyDelta
from enchtable_jax.models.identity import identity
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


@pytest.mark.parametrize("rank", [64, 3])  # 64: every matrix's full rank here (exact); 3: truncated
def test_adapter_out_is_the_merge_as_a_peft_adapter(lora_world, tmp_path, rank):
    """PEFT applying the written adapter to the base gives our merged model: exactly (to float32) at full rank;
    truncated, each matrix differs by |α·w|·√(Σ_{i>r} σ_i²) of τ_safe (Eckart–Young; float64 numpy SVD)."""
    import peft
    import torch
    import transformers

    result = _merge(lora_world, "adapter", "enchtable", out=tmp_path / "merged", adapter_out=tmp_path / "adapter",
                    adapter_rank=rank, alpha=5.0)  # a correction well above the outputs' float32 rounding
    base = transformers.AutoModelForCausalLM.from_pretrained(lora_world["base"], dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").merge_and_unload().state_dict()
    weights = {t["name"]: t["weight"] for t in result.report["tensors"] if t["merged"]}
    safety = SafetyDelta(None, lora_world["base"], lora_world["harmful"])
    truncated = 0
    for name, array in ej.load(tmp_path / "merged").params.items():
        ours, other = np.asarray(array, np.float64), theirs[name].numpy().astype(np.float64)
        sigma = np.linalg.svd(safety.read(name).astype(np.float64), compute_uv=False) if name in weights else []
        if len(sigma) <= rank:
            np.testing.assert_allclose(other, ours, rtol=1e-5, atol=1e-5, err_msg=name)
            continue
        truncated += 1
        tail = abs(result.report["alpha"] * weights[name]) * np.sqrt(np.sum(sigma[rank:] ** 2))
        assert np.linalg.norm(other - ours) == pytest.approx(tail, rel=1e-3), name
    assert truncated == (len(weights) if rank == 3 else 0)
    record = json.loads((tmp_path / "adapter" / "enchtable_adapter.json").read_text())
    assert {t["name"] for t in record["tensors"] if t["correction_rank"]} == set(weights)
    assert (result.report["adapter"]["captured_min"] < 0.9) == (rank == 3)


def test_adapter_out_reads_the_vectors_cached_triplets(lora_world, tmp_path, monkeypatch):
    """With a safety-vector folder, the corrections come from its cached decomposition (the merge wrote it): the
    same factors' products as computed afresh (with no cache)."""
    base, harmful = ej.load(lora_world["base"]), ej.load(lora_world["harmful"])
    tau = {n: np.asarray(base.params[n]) - np.asarray(harmful.params[n]) for n in base.params if ".layers." in n
           and base.params[n].ndim == 2}
    vector = tmp_path / "vector"
    write_vector(vector, tau, {"base_model": identity(base.config, base.params)})
    reads = []
    monkeypatch.setattr(decomposition.Cache, "read", lambda self, *a, _read=decomposition.Cache.read:
                        reads.append(a[0]) or _read(self, *a))
    products = {}
    for run, cache in (("computed", False), ("cached", True)):  # no cache file yet, then the first merge's
        merge("enchtable", lora_world["base"], lora_world["adapter"], safety_vector=vector, progress=False,
              adapter_out=tmp_path / run, adapter_rank=5, cache_decomposition=cache)
        with safetensors.safe_open(tmp_path / run / "adapter_model.safetensors", "np") as f:
            products[run] = {k.removesuffix(".lora_A.weight"): f.get_tensor(k.replace("lora_A", "lora_B")) @
                             f.get_tensor(k) for k in f.keys() if k.endswith(".lora_A.weight")}
        assert bool(reads) == cache and set(reads) >= (set(tau) if cache else set())
        reads.clear()
    assert products["cached"].keys() == products["computed"].keys()
    for module, product in products["cached"].items():
        np.testing.assert_allclose(product, products["computed"][module], rtol=1e-4, atol=1e-6, err_msg=module)


def test_adapter_out_refuses_a_dense_task_and_an_unweighted_method(lora_world, tmp_path, capsys):
    """Refused before any work, naming the option, and nothing written."""
    common = ["merge", "--base", str(lora_world["base"]), "--aligned", str(lora_world["base"]), "--harmful",
              str(lora_world["harmful"]), "--out", str(tmp_path / "merged"), "--adapter-out", str(tmp_path / "a")]
    for task, method, why in [("dense", "enchtable", "needs a PEFT LoRA adapter"),
                              ("adapter", "ties", "has no low-rank correction")]:
        assert main([*common, "--task", str(lora_world[task]), "--method", method, "--alpha", "0.5"]) == 2
        assert why in capsys.readouterr().err
    before = sorted(p.name for p in lora_world["adapter"].iterdir())
    for where, why in [(lora_world["adapter"] / "out", "is inside the input --task"),
                       (tmp_path / "merged" / "a", "is inside the input --out")]:
        common[-1] = str(where)  # the adapter folder inside an input, or inside the merged model's folder
        assert main([*common, "--task", str(lora_world["adapter"]), "--method", "enchtable"]) == 2
        assert "--adapter-out" in (err := capsys.readouterr().err) and why in err, err
    assert not list(tmp_path.iterdir()) and sorted(p.name for p in lora_world["adapter"].iterdir()) == before


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
