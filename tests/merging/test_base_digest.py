"""The remembered base digest (merging/base_digest.py): a second merge over the same base files does not hash them
again and merges the same bytes, while a base whose file was rewritten in place (same size, mtime set back) is
hashed again, so a vector from another base is still refused; a base holding a NaN is still refused from the
record."""

from __future__ import annotations

import hashlib
import os

import jax.numpy as jnp
import numpy as np
import pytest

import enchtable_jax as ej
from enchtable_jax.converters import safetensors_format as stf
from enchtable_jax.converters.safety_vector import write_vector
from enchtable_jax.merging import base_digest
from enchtable_jax.models import init_params, preset_config
from enchtable_jax.models.identity import WeightsDigest, identity
from enchtable_jax.nonfinite import NonFiniteError

CONFIG = preset_config("tiny", num_hidden_layers=1, hidden_size=16, intermediate_size=24, vocab_size=32)
MLP = "model.layers.0.mlp.up_proj.weight"


@pytest.fixture
def world(tmp_path, monkeypatch):
    """A record folder of the test's own; base and task folders, and a vector distilled (here: drawn) from base."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    params = {n: np.asarray(v) for n, v in init_params(CONFIG, seed=0, std=0.1).items()}
    rng = np.random.default_rng(0)
    task = {n: v + np.float32(0.01) * rng.standard_normal(v.shape, np.float32) for n, v in params.items()}
    folders = {role: ej.save(ej.Model(CONFIG, {n: jnp.asarray(v) for n, v in p.items()}), tmp_path / role,
                             progress=False) for role, p in (("base", params), ("task", task))}
    tau = {MLP: np.float32(0.02) * rng.standard_normal(params[MLP].shape, np.float32)}
    folders["vector"] = tmp_path / "vector"
    write_vector(folders["vector"], tau, {"base_model": identity(CONFIG, params)})
    return folders


def _merge(world, out):
    return ej.merge("task_arithmetic", world["base"], world["task"], safety_vector=world["vector"], alpha=1.0,
                    out=out, progress=False)


def _hashed(monkeypatch) -> list[str]:
    """The names WeightsDigest.update sees from now on."""
    seen: list[str] = []
    update = WeightsDigest.update
    monkeypatch.setattr(WeightsDigest, "update", lambda self, name, arr: (seen.append(name), update(self, name, arr)))
    return seen


def test_a_second_merge_does_not_hash_the_base_again(world, tmp_path, monkeypatch):
    seen = _hashed(monkeypatch)
    _merge(world, tmp_path / "first")
    assert sorted(seen) == sorted(ej.load(world["base"]).params) and len(list(base_digest.record_dir().iterdir())) == 1
    seen.clear()
    _merge(world, tmp_path / "second")
    assert seen == []
    files = sorted(p.name for p in (tmp_path / "first").glob("*.safetensors"))
    assert files and all((tmp_path / "first" / f).read_bytes() == (tmp_path / "second" / f).read_bytes() for f in files)


def test_a_base_rewritten_in_place_is_hashed_again_and_the_vector_refused(world, tmp_path, monkeypatch):
    _merge(world, tmp_path / "first")  # remembered
    weights = world["base"] / "model.safetensors"
    stat = os.stat(weights)
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 1  # one bit of the last tensor's last entry: same size
    weights.write_bytes(bytes(raw))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # mtime set back; the ctime cannot be
    seen = _hashed(monkeypatch)
    with pytest.raises(ValueError, match="another model"):
        _merge(world, tmp_path / "second")
    assert seen and not (tmp_path / "second").exists()


def test_a_nonfinite_base_is_refused_from_the_record_too(world, tmp_path):
    weights = world["base"] / "model.safetensors"
    model = ej.load(world["base"])
    params = {n: np.asarray(v).copy() for n, v in model.params.items()}
    params[MLP][0, 0] = np.nan
    stf.write_file(weights, sorted(params.items()), np.asarray, {"format": "pt"})
    for out in ("first", "second"):  # hashed, then remembered
        with pytest.raises(NonFiniteError, match=f"tensor {MLP} holds 1 NaN"):
            _merge(world, tmp_path / out)
    assert len(list(base_digest.record_dir().iterdir())) == 1


def test_file_sha256_is_remembered_until_the_file_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = tmp_path / "vector.safetensors"
    path.write_bytes(b"a" * 1000)
    assert base_digest.file_sha256(path) == hashlib.sha256(b"a" * 1000).hexdigest()
    monkeypatch.setattr(hashlib, "file_digest", lambda *a: pytest.fail("hashed again"))
    assert base_digest.file_sha256(path) == hashlib.sha256(b"a" * 1000).hexdigest()  # from the record
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    stat = os.stat(path)
    path.write_bytes(b"b" * 1000)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert base_digest.file_sha256(path) == hashlib.sha256(b"b" * 1000).hexdigest()
