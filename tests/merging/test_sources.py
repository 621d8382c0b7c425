"""The merge's reads: a tensor mapped from its file equals what the safetensors package reads, and τ_safe's zero test
(chunked, stopping early), its in-place read and pass 1's reads of the base behave as the float64 formulas say."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from enchtable_jax.bench.synthetic import base_tensor, write_model
from enchtable_jax.converters import SafetensorsError
from enchtable_jax.converters import safetensors_format as stf
from enchtable_jax.merging import executor, sources
from enchtable_jax.merging.sources import SafetyDelta, open_model
from enchtable_jax.models import preset_config


def test_mapped_tensor_equals_the_safetensors_package_and_is_read_only(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"a": rng.standard_normal((3, 5)).astype(np.float32),  # odd sizes: offsets off page boundaries
               "b": rng.standard_normal(7).astype(ml_dtypes.bfloat16), "c": np.array(2.5, np.float64),
               "d": np.zeros((0, 4), np.float16), "e": rng.integers(-9, 9, (2, 3)).astype(np.int8),
               "f": rng.standard_normal((70, 300)).astype(np.float32)}  # spans several pages
    file = tmp_path / "x.safetensors"
    safetensors.numpy.save_file({k: v for k, v in tensors.items() if k != "b"}, str(file))
    infos, _ = stf.read_header(file)
    expected = safetensors.numpy.load_file(str(file))
    with open(file, "rb") as f:
        mapped = {name: stf.map_tensor(f, info) for name, info in infos.items()}
    for name, arr in expected.items():  # the handle is closed: the maps live on their own
        assert mapped[name].dtype == arr.dtype and mapped[name].shape == arr.shape
        assert mapped[name].tobytes() == arr.tobytes()
    assert not mapped["f"].flags.writeable

    bf16 = tmp_path / "bf16.safetensors"  # bfloat16, which the package's numpy path reads as raw bytes only
    stf.write_file(bf16, [("b", tensors["b"])], lambda a: a, {})
    infos, _ = stf.read_header(bf16)
    with open(bf16, "rb") as f:
        assert stf.map_tensor(f, infos["b"]).tobytes() == tensors["b"].tobytes()


def test_mapping_a_file_that_shrank_is_a_safetensors_error(tmp_path):
    file = tmp_path / "x.safetensors"
    safetensors.numpy.save_file({"w": np.ones((64, 64), np.float32)}, str(file))
    infos, _ = stf.read_header(file)
    with open(file, "rb") as f:
        with open(file, "r+b") as g:
            g.truncate(file.stat().st_size - 8)
        with pytest.raises(SafetensorsError, match="tensor w is truncated"):
            stf.map_tensor(f, infos["w"])


@pytest.fixture
def pair(tmp_path, monkeypatch):
    """(aligned, harmful) folders of the tiny preset whose differences are chosen per tensor, and the chunk size made
    small so that every tensor spans many chunks."""
    monkeypatch.setattr(sources, "_CHUNK", 100)
    config = preset_config("tiny")
    last = "model.layers.0.mlp.gate_proj.weight"  # differs in its very last entry only
    signed_zero = "model.layers.0.mlp.up_proj.weight"  # +0 against −0 only
    nan_both = "model.layers.0.mlp.down_proj.weight"  # NaN at the same place in both

    def harmful(name, shape):
        x = base_tensor(name, shape)
        if name == signed_zero:
            x.reshape(-1)[:50] = 0.0
        return x

    def aligned(name, shape):
        x = harmful(name, shape)
        if name == last:
            x.reshape(-1)[-1] += 1.0
        if name == signed_zero:
            x.reshape(-1)[:50] = -0.0
        return x

    folders = [write_model(tmp_path / role, config, fn) for role, fn in (("aligned", aligned), ("harmful", harmful))]
    for folder in folders:  # the writer refuses NaN: put it in afterwards, by the package
        file = str(folder / "model.safetensors")
        tensors = safetensors.numpy.load_file(file)
        tensors[nan_both].reshape(-1)[3] = np.nan
        safetensors.numpy.save_file(tensors, file, {"format": "pt"})
    return SafetyDelta(aligned=folders[0], harmful=folders[1]), {"last": last, "signed_zero": signed_zero,
                                                                   "nan_both": nan_both}


def _oracle(safety: SafetyDelta, name: str) -> np.ndarray:
    """τ_safe in float64 from the two files as the safetensors package reads them."""
    read = [safetensors.numpy.load_file(str(source.folder / "model.safetensors"))[name]
            for source in (safety.aligned, safety.harmful)]
    return read[0].astype(np.float64) - read[1].astype(np.float64)


def test_zero_test_and_in_place_read_follow_the_float64_difference(pair):
    safety, cases = pair
    for name in sorted(safety.names()):
        tau = _oracle(safety, name)
        assert safety.any_nonzero(name) == bool(np.any(tau)), name
        out = np.full(tau.shape, 7.0, np.float32)
        safety.read_into(name, out)
        np.testing.assert_array_equal(out, tau.astype(np.float32))
        np.testing.assert_array_equal(safety.read(name), tau.astype(np.float32))
    assert safety.any_nonzero(cases["last"]) and safety.any_nonzero(cases["nan_both"])
    assert sum(safety.any_nonzero(n) for n in safety.names()) == 2  # the others, ±0 included, are zero


def test_pass_one_reads_the_base_only_for_the_digest_or_the_norms(pair, tmp_path, monkeypatch):
    safety, cases = pair
    base = open_model(safety.harmful.folder, "base")
    task = open_model(safety.aligned.folder, "task")
    reads = []
    reader = base._reader
    monkeypatch.setattr(base, "_reader", lambda name: reads.append(name) or reader(name))
    fixed = executor.plan(base, task, safety, "task_arithmetic", 1.0, None, progress=False)
    assert reads == []
    merged = {n for n, t in fixed.tensors.items() if t.merge}
    assert merged == {cases["last"], cases["nan_both"]}
    assert fixed.tensors[cases["signed_zero"]].reason == "safety delta is zero"
    with pytest.raises(Exception, match="NaN"):  # adaptive α reads the base (and τ_safe) for the norms
        executor.plan(base, task, safety, "task_arithmetic", None, 0.1, progress=False)
    assert reads
