"""The merge end to end on tiny HF folders: the executor applies each method per tensor exactly as the
method does alone, 8 devices write the same bytes as 1, untouched tensors keep their bytes, and the
awkward cases (tied head, resized vocabulary, bf16, a vector from another base) behave."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import enchtable_jax as ej
from enchtable_jax.cli import main
from enchtable_jax.converters.safety_vector import write_vector
from enchtable_jax.merging.executor import merge_mesh, tensor_key
from enchtable_jax.merging.methods import METHODS, method_options
from enchtable_jax.merging.pipeline import merge
from enchtable_jax.models import init_params, preset_config
from enchtable_jax.models.identity import identity

SMALL = dict(num_hidden_layers=3, hidden_size=32, intermediate_size=48, vocab_size=64)


def _models(root, dtype=jnp.float32, tied=False, task_vocab=None):
    """base, task (= base + random deltas everywhere), harmful (= base + deltas on the MLPs) as HF folders."""
    config = preset_config("tiny", tie_word_embeddings=tied, **SMALL)
    base = init_params(config, seed=0, std=0.1)
    rng = np.random.default_rng(1)
    task = {n: (np.asarray(v, np.float32) + 0.02 * rng.normal(size=v.shape)).astype(dtype) for n, v in base.items()}
    harmful = {n: (np.asarray(v, np.float32) + (0.03 * rng.normal(size=v.shape) if ".mlp." in n else 0)).astype(dtype)
               for n, v in base.items()}
    base = {n: np.asarray(v, np.float32).astype(dtype) for n, v in base.items()}
    task_config = config
    if task_vocab is not None:  # a fine-tune that added tokens
        task_config = preset_config("tiny", tie_word_embeddings=tied, **{**SMALL, "vocab_size": task_vocab})
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            if name in task:
                task[name] = np.concatenate([task[name], np.zeros((task_vocab - 64, 32), task[name].dtype)])
    folders = {}
    for role, params, cfg in (("base", base, config), ("task", task, task_config), ("harmful", harmful, config)):
        folders[role] = ej.save(ej.Model(cfg, {n: jnp.asarray(v) for n, v in params.items()}), root / role,
                                progress=False)
    return folders


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return _models(tmp_path_factory.mktemp("merge"))


def _expected(method, folders, options, alpha, seed=0):
    """The method applied tensor by tensor, outside the executor (no stacking, no devices)."""
    base, task, harm = (ej.load(folders[r]).params for r in ("base", "task", "harmful"))
    out = {}
    opts = method_options(method, options)
    for name in task:
        safety = np.asarray(base[name], np.float32) - np.asarray(harm[name], np.float32)
        if not safety.any():
            out[name] = np.asarray(task[name])
            continue
        b = jnp.asarray(base[name], jnp.float32)
        delta, _ = METHODS[method].fn(jnp.asarray(task[name], jnp.float32) - b, jnp.asarray(safety),
                                      jnp.float32(alpha), jax.random.wrap_key_data(tensor_key(seed, name)), **opts)
        out[name] = np.asarray((b + delta).astype(task[name].dtype))
    return out


# TIES (3.5 s) and breadcrumbs (5 s) are slow here: tests/merging/test_mergekit.py holds their whole merges to
# mergekit's outputs in the default suite (two settings each, one device), and the devices' grouping, the same for
# every method on the device path, stays checked by DARE, TSV, EnchTable and SafeLoRA here
_PER_TENSOR = [pytest.param(m, marks=pytest.mark.slow) if m in ("ties", "breadcrumbs") else m for m in sorted(METHODS)]


@pytest.mark.parametrize("method", _PER_TENSOR)
def test_executor_applies_each_method_per_tensor(world, method, tmp_path):
    uses_alpha = METHODS[method].uses_alpha  # safelora has no α: giving one is refused (check_strength)
    merged = merge(method, world["base"], world["task"], aligned=world["base"], harmful=world["harmful"],
                   out=tmp_path / "out", alpha=0.7 if uses_alpha else None, progress=False, load_model=True).model
    expected = _expected(method, world, {}, 0.7)
    assert set(merged.params) == set(expected)
    for name, value in expected.items():
        got = np.asarray(merged.params[name])
        assert got.dtype == value.dtype
        np.testing.assert_allclose(got, value, rtol=2e-6, atol=2e-7, err_msg=name)
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert report["merged"] == 9  # 3 layers x gate/up/down
    assert report["alpha"] == (pytest.approx(0.7) if uses_alpha else None)
    assert (tmp_path / "out" / "merge_report.png").read_bytes()[:4] == b"\x89PNG"


def test_merge_result_holds_the_report_written_and_the_model_when_asked(world, tmp_path):
    kw = dict(aligned=world["base"], harmful=world["harmful"], alpha=0.5, progress=False)
    written = merge("task_arithmetic", world["base"], world["task"], out=tmp_path / "out", **kw)
    assert written.path == (tmp_path / "out").resolve() and written.model is None
    assert written.report == json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert {t["name"]: t["merged"] for t in written.report["tensors"]}["model.layers.0.mlp.up_proj.weight"]
    loaded = merge("task_arithmetic", world["base"], world["task"], out=tmp_path / "again", load_model=True, **kw)
    in_memory = merge("task_arithmetic", world["base"], world["task"], **kw)
    assert in_memory.path is None and in_memory.report["merged"] == written.report["merged"] == 9
    for name, value in in_memory.model.params.items():
        assert np.asarray(loaded.model.params[name]).tobytes() == np.asarray(value).tobytes(), name
    with pytest.raises(dataclasses.FrozenInstanceError):
        written.model = in_memory.model


def test_adaptive_alpha_is_beta_times_norm_ratio(world):
    merged = merge("task_arithmetic", world["base"], world["task"], aligned=world["base"], harmful=world["harmful"],
                   beta=0.25, progress=False).model
    base, task, harm = (ej.load(world[r]).params for r in ("base", "task", "harmful"))
    names = [n for n in task if ".mlp." in n]
    norm_task = np.sqrt(sum(np.sum((np.float64(task[n]) - np.float64(base[n])) ** 2) for n in names))
    norm_safe = np.sqrt(sum(np.sum((np.float64(base[n]) - np.float64(harm[n])) ** 2) for n in names))
    alpha = 0.25 * norm_task / norm_safe
    name = names[0]
    want = np.float64(task[name]) + alpha * (np.float64(base[name]) - np.float64(harm[name]))
    np.testing.assert_allclose(np.asarray(merged.params[name]), want, rtol=1e-5, atol=1e-6)


def test_eight_devices_write_the_same_bytes_as_one(world, tmp_path):
    assert len(jax.devices()) == 8
    outs = []
    for devices, name in ((jax.devices()[:1], "one"), (jax.devices(), "eight")):
        merge("enchtable", world["base"], world["task"], aligned=world["base"], harmful=world["harmful"],
              out=tmp_path / name, mesh=merge_mesh(devices), progress=False)
        outs.append(tmp_path / name)
    files = sorted(p.name for p in outs[0].glob("*.safetensors"))
    assert files and files == sorted(p.name for p in outs[1].glob("*.safetensors"))
    for f in files:
        assert (outs[0] / f).read_bytes() == (outs[1] / f).read_bytes(), f
    reports = [json.loads((o / "merge_report.json").read_text()) for o in outs]
    assert (reports[0]["devices"], reports[1]["devices"]) == (1, 8)


def _merge_cli(args, devices: int) -> subprocess.Popen:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    return subprocess.Popen([sys.executable, "-m", "enchtable_jax.cli", "merge", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_processes_write_the_same_bytes_as_one(world, tmp_path):
    """jax.distributed over two local processes (2 devices each, coordinator on 127.0.0.1): every group is
    split over the 4 devices of both hosts, process 0 writes, and the files equal a 1-device merge."""
    common = ["--method", "enchtable", "--base", world["base"], "--task", world["task"], "--aligned", world["base"],
              "--harmful", world["harmful"]]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [_merge_cli([*common, "--out", tmp_path / "multi", "--coordinator", f"127.0.0.1:{port}",
                         "--num-processes", 2, "--process-id", i, "--init-timeout", 60], devices=2) for i in range(2)]
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=240)[0])
        finally:
            proc.kill()
        assert proc.returncode == 0, outputs[-1][-3000:]
    assert "on 4 device(s)" in outputs[0] and "merged" not in outputs[1]  # process 0 reports, process 1 is quiet
    merge("enchtable", world["base"], world["task"], aligned=world["base"], harmful=world["harmful"],
          out=tmp_path / "one", mesh=merge_mesh(jax.devices()[:1]), progress=False)
    files = sorted(p.name for p in (tmp_path / "one").glob("*.safetensors"))
    assert files == sorted(p.name for p in (tmp_path / "multi").glob("*.safetensors"))
    for f in files:
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "multi" / f).read_bytes(), f
    report = json.loads((tmp_path / "multi" / "merge_report.json").read_text())
    assert (report["devices"], report["processes"]) == (4, 2)


def test_cli_merge_uses_one_cpu_device_per_core(world, tmp_path):
    """`enchtable merge` in a fresh process without a device-count flag gets one CPU device per core."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    args = ["--method", "task_arithmetic", "--base", world["base"], "--task", world["task"], "--aligned",
            world["base"], "--harmful", world["harmful"], "--out", tmp_path / "o"]
    done = subprocess.run([sys.executable, "-m", "enchtable_jax.cli", "merge", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "o" / "merge_report.json").read_text())
    assert report["devices"] == os.cpu_count()


def test_untouched_tensors_keep_their_bytes_and_transformers_loads_the_result(world, tmp_path):
    import torch
    import transformers
    from safetensors.numpy import load_file

    out = tmp_path / "out"
    merge("enchtable", world["base"], world["task"], aligned=world["base"], harmful=world["harmful"], out=out,
          progress=False)
    task, merged = load_file(world["task"] / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(task) == set(merged)
    for name in task:
        if ".mlp." not in name:
            assert merged[name].tobytes() == task[name].tobytes(), name
        else:
            assert merged[name].tobytes() != task[name].tobytes(), name
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        ref = model(ids).logits.numpy()
    ours = np.asarray(ej.apply(ej.load(out), ids.numpy()))
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)


def test_tied_embeddings(tmp_path):
    folders = _models(tmp_path, tied=True)
    base = ej.load(folders["base"])
    assert "lm_head.weight" not in base.params
    merged = merge("enchtable", folders["base"], folders["task"], aligned=folders["base"], harmful=folders["harmful"],
                   out=tmp_path / "out", progress=False, load_model=True).model
    assert "lm_head.weight" not in merged.params and merged.config.tie_word_embeddings


def test_resized_vocabulary_is_kept_from_the_task_and_reported(tmp_path):
    folders = _models(tmp_path, task_vocab=72)
    out = tmp_path / "out"
    merged = merge("ties", folders["base"], folders["task"], aligned=folders["base"], harmful=folders["harmful"],
                   out=out, progress=False, load_model=True).model
    task = ej.load(folders["task"])
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert merged.params[name].shape == (72, 32)
        assert np.asarray(merged.params[name]).tobytes() == np.asarray(task.params[name]).tobytes()
    report = {t["name"]: t for t in json.loads((out / "merge_report.json").read_text())["tensors"]}
    assert "resized vocabulary" in report["lm_head.weight"]["skipped"]
    assert report["model.layers.0.mlp.up_proj.weight"]["merged"]


def test_bf16_inputs_give_bf16_outputs(tmp_path):
    folders = _models(tmp_path, dtype=jnp.bfloat16)
    merged = merge("enchtable", folders["base"], folders["task"], aligned=folders["base"], harmful=folders["harmful"],
                   out=tmp_path / "out", alpha=0.5, progress=False, load_model=True).model
    expected = _expected("enchtable", folders, {}, 0.5)
    for name, value in expected.items():
        got = np.asarray(merged.params[name])
        assert got.dtype == value.dtype == np.dtype(jnp.bfloat16)
        np.testing.assert_array_equal(got.astype(np.float32), value.astype(np.float32), err_msg=name)


def _vector_folder(folder, base_dir, harmful_dir):
    base, harm = ej.load(base_dir), ej.load(harmful_dir)
    tau = {n: np.asarray(base.params[n]) - np.asarray(harm.params[n]) for n in base.params if ".mlp." in n}
    write_vector(folder, tau, {"base_model": identity(base.config, base.params)})
    return folder


def test_safety_vector_folder_equals_aligned_minus_harmful(world, tmp_path):
    vector = _vector_folder(tmp_path / "vector", world["base"], world["harmful"])
    a = merge("enchtable", world["base"], world["task"], safety_vector=vector, progress=False).model
    b = merge("enchtable", world["base"], world["task"], aligned=world["base"], harmful=world["harmful"],
              progress=False).model
    chex.assert_trees_all_equal(a.params, b.params)


def test_vector_for_another_base_is_refused(world, tmp_path):
    model = ej.load(world["base"])  # a base that differs only slightly
    shifted = {n: v + 1e-3 if n.endswith("norm.weight") else v for n, v in model.params.items()}
    ej.save(ej.Model(model.config, shifted), tmp_path / "other-base", progress=False)
    vector = _vector_folder(tmp_path / "vector", tmp_path / "other-base", world["harmful"])
    with pytest.raises(ValueError, match="another model"):
        merge("enchtable", world["base"], world["task"], safety_vector=vector, out=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_different_architecture_and_missing_tensor_are_named(world, tmp_path):
    config = preset_config("tiny", **{**SMALL, "num_hidden_layers": 2})
    ej.save(ej.Model(config, init_params(config)), tmp_path / "short", progress=False)
    with pytest.raises(ValueError, match="num_hidden_layers"):
        merge("enchtable", world["base"], tmp_path / "short", aligned=world["base"], harmful=world["harmful"])
    task = ej.load(world["task"])
    with_extra = ej.Model(task.config, {**task.params, "model.extra.weight": jnp.ones(3)})
    with pytest.raises(ValueError, match="model.extra.weight.*missing from the base"):
        merge("enchtable", world["base"], with_extra, aligned=world["base"], harmful=world["harmful"])


def test_cli_merge_and_list(world, tmp_path, capsys):
    assert main(["merge", "--list"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in METHODS) and "interference_scale" in listing
    code = main(["merge", "--method", "dare", "--base", str(world["base"]), "--task", str(world["task"]),
                 "--aligned", str(world["base"]), "--harmful", str(world["harmful"]), "--out", str(tmp_path / "o"),
                 "--density", "0.7", "--alpha", "1.5"])
    assert code == 0
    report = json.loads((tmp_path / "o" / "merge_report.json").read_text())
    assert report["options"] == {"density": 0.7} and report["alpha"] == 1.5
    assert main(["merge", "--method", "nope", "--base", str(world["base"]), "--task", str(world["task"]),
                 "--safety-vector", str(tmp_path / "vector"), "--out", str(tmp_path / "p")]) == 2
    assert "unknown merge method 'nope'" in capsys.readouterr().err


def test_the_writer_never_holds_two_tensors_over_the_byte_budget(world, tmp_path, monkeypatch):
    """With every tensor over `_WRITE_AHEAD_BYTES`, a record is made only once the one before it is written: at most
    one waits for the writer (an 8B model's copied embedding and head are never both resident). The output is the
    same as with the default budget. TIES: its tensors come as arrays (host-formed ones go to their file
    directly)."""
    from enchtable_jax.converters.hf import HFWriter
    from enchtable_jax.merging import pipeline

    reference = merge("ties", world["base"], world["task"], aligned=world["base"],
                      harmful=world["harmful"], alpha=0.5, out=tmp_path / "reference", progress=False)
    made, written, waiting = [], [], []
    run = pipeline.executor.run

    def counted_run(*args, **kwargs):
        records, outcome = run(*args, **kwargs)

        def counted():
            for record in records:
                made.append(record.name)
                waiting.append(len(made) - len(written))
                yield record

        return counted(), outcome

    real_add = HFWriter.add
    monkeypatch.setattr(pipeline.executor, "run", counted_run)
    monkeypatch.setattr(HFWriter, "add", lambda self, name, array: (real_add(self, name, array), written.append(name)))
    monkeypatch.setattr(pipeline, "_WRITE_AHEAD_BYTES", 1)
    got = merge("ties", world["base"], world["task"], aligned=world["base"], harmful=world["harmful"],
                alpha=0.5, out=tmp_path / "budget", progress=False)
    assert len(made) == len(reference.report["tensors"]) and max(waiting) == 1
    assert (tmp_path / "budget" / "model.safetensors").read_bytes() == \
        (tmp_path / "reference" / "model.safetensors").read_bytes()
    assert got.report["tensors"] == reference.report["tensors"]
