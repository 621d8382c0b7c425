"""The bench's plain PyTorch `enchtable` merge writes the same merged model as ours."""

from __future__ import annotations

import json

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import enchtable_jax as ej
from enchtable_jax.bench.optional import reference_module
from enchtable_jax.converters.safety_vector import write_vector
from enchtable_jax.models import init_params, preset_config
from enchtable_jax.models.identity import identity

torch_merge, _why = reference_module("torch_merge")  # benchmarks/torch_merge.py
assert torch_merge is not None, _why

SMALL = {"num_hidden_layers": 3, "hidden_size": 32, "intermediate_size": 48, "vocab_size": 64}


def _world(root, dtype=jnp.float32):
    """base, task (= base + noise everywhere) as HF folders, and a safety vector on every 2-D layer matrix
    plus one norm (the non-2-D path); built like tests/merging/test_merge.py::_models."""
    config = preset_config("tiny", **SMALL)
    base = init_params(config, seed=0, std=0.1)
    rng = np.random.default_rng(1)
    task = {n: (np.asarray(v, np.float32) + 0.02 * rng.normal(size=v.shape)).astype(dtype) for n, v in base.items()}
    base = {n: np.asarray(v, np.float32).astype(dtype) for n, v in base.items()}
    folders = {}
    for role, params in (("base", base), ("task", task)):
        folders[role] = ej.save(ej.Model(config, {n: jnp.asarray(v) for n, v in params.items()}), root / role,
                                progress=False)
    tau = {n: (0.03 * rng.normal(size=v.shape)).astype(np.float32) for n, v in base.items()
           if n.startswith("model.layers.") and (v.ndim == 2 or n.endswith("1.post_attention_layernorm.weight"))}
    loaded = ej.load(folders["base"])
    write_vector(root / "vector", tau, {"base_model": identity(loaded.config, loaded.params)})
    folders["vector"], folders["tau"] = root / "vector", tau
    return folders


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return _world(tmp_path_factory.mktemp("torch-merge"))


def _tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_torch_reference_writes_the_same_merged_model_as_ours(world, tmp_path):
    ej.merge("enchtable", world["base"], world["task"], safety_vector=world["vector"], out=tmp_path / "ours",
             progress=False)
    info = torch_merge.merge(world["base"], world["task"], tmp_path / "torch", safety_vector=world["vector"])
    ours, theirs, task = _tensors(tmp_path / "ours"), _tensors(tmp_path / "torch"), _tensors(world["task"])
    assert set(ours) == set(theirs) == set(task)
    for name in task:
        assert theirs[name].dtype == ours[name].dtype, name
        if name in world["tau"]:
            assert not np.array_equal(theirs[name], task[name]), name
            np.testing.assert_allclose(theirs[name], ours[name], rtol=1e-4, atol=1e-6, err_msg=name)
        else:  # copied unchanged
            assert theirs[name].tobytes() == task[name].tobytes() == ours[name].tobytes(), name
    report = json.loads((tmp_path / "ours" / "merge_report.json").read_text())
    assert info["alpha"] == pytest.approx(report["alpha"], rel=1e-6)
    stats = {t["name"]: t for t in report["tensors"]}
    weights = [w for n, w in info["weights"].items() if n in info["interference"]]
    assert len(weights) == 21 and 0 < min(weights) and max(weights) < 1  # 3 layers x 7 matrices
    for name, iota in info["interference"].items():
        assert stats[name]["interference"] == pytest.approx(iota, rel=1e-4), name
        assert stats[name]["weight"] == pytest.approx(info["weights"][name], rel=1e-4), name
    assert (tmp_path / "torch" / "config.json").is_file()
    assert ej.load(tmp_path / "torch").config.hidden_size == SMALL["hidden_size"]


def test_given_arrays_shards_and_plain_svd_agree(world, tmp_path):
    a = torch_merge.merge(world["base"], world["task"], tmp_path / "a", safety_vector=world["vector"])
    b = torch_merge.merge(world["base"], world["task"], tmp_path / "b", safety=world["tau"], shard_size=20_000,
                          transpose_wide=False)
    assert (tmp_path / "b" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "b").glob("model-*-of-*.safetensors"))) > 1
    assert a["alpha"] == pytest.approx(b["alpha"], rel=1e-12)
    ta, tb = _tensors(tmp_path / "a"), _tensors(tmp_path / "b")
    chex.assert_trees_all_close(ta, tb, rtol=1e-5, atol=1e-7)
    with pytest.raises(FileExistsError):
        torch_merge.merge(world["base"], world["task"], tmp_path / "a", safety_vector=world["vector"])


def test_merge_study_agreement_measures_the_difference(world, tmp_path):
    """The merge study's `agreement`: ~float rounding for ours vs torch, and a planted change is found."""
    import shutil

    from safetensors.numpy import save_file

    from enchtable_jax.bench.studies.merge import agreement

    ej.merge("enchtable", world["base"], world["task"], safety_vector=world["vector"], out=tmp_path / "ours",
             progress=False)
    torch_merge.merge(world["base"], world["task"], tmp_path / "torch", safety_vector=world["vector"])
    merged = sorted(world["tau"])
    got = agreement(tmp_path / "ours", tmp_path / "torch", world["task"], merged)
    assert got["same_tensor_names"] and got["copied_identical"]
    assert got["max_abs_over_max"] < 1e-5 and got["safety_part"] < 1e-4

    shutil.copytree(tmp_path / "ours", tmp_path / "changed")
    tensors = _tensors(tmp_path / "changed")
    name = "model.layers.2.mlp.down_proj.weight"
    task, theirs = _tensors(world["task"])[name], _tensors(tmp_path / "torch")[name]
    tensors[name] = theirs + 0.01 * (theirs - task)  # the safety part off by 1%
    copied = next(n for n in tensors if n not in merged)
    tensors[copied] = tensors[copied] * 2
    for f in (tmp_path / "changed").glob("*.safetensors"):
        f.unlink()
    save_file(tensors, str(tmp_path / "changed" / "model.safetensors"))
    got = agreement(tmp_path / "changed", tmp_path / "torch", world["task"], merged)
    assert got["safety_part"] == pytest.approx(0.01, rel=1e-3) and got["safety_part_tensor"] == name
    assert not got["copied_identical"]


def test_reference_interference_of_a_low_rank_task_drops_its_null_triplets_as_ours_does():
    """A rank-3 τ_task (a LoRA adapter's): both implementations give ι over its 3 live triplets only, whatever
    basis their SVDs picked for its null space (oracle: the float64 formula, oracles.iota64)."""
    import torch

    from oracles import iota64

    from enchtable_jax.kernels import spectral

    rng = np.random.default_rng(0)
    task = (rng.standard_normal((48, 3)) @ rng.standard_normal((3, 40)) * 0.1).astype(np.float32)
    safety = (rng.standard_normal((48, 40)) * 0.05).astype(np.float32)
    expected = iota64(task.astype(np.float64), safety.astype(np.float64), 0.5, 200.0)
    theirs = float(torch_merge.interference(torch.from_numpy(task), torch.from_numpy(safety)))
    ours = float(spectral.interference(jnp.asarray(task), jnp.asarray(safety)))
    np.testing.assert_allclose([theirs, ours], [expected, expected], rtol=1e-4)
