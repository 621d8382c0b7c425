"""The safety vector's cached decomposition (merging/decomposition.py) and the null-triplet rule of ι.

Oracles: the merge without a cache (bytes), float64 numpy SVDs, and ι's formula in float64 over the triplets
whose singular value is not zero.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from jax import numpy as jnp
from oracles import iota64

from enchtable_jax.bench.studies.merge import build_world
from enchtable_jax.calibration import EnchtableSweep
from enchtable_jax.converters.hf import index_weights, iter_tensors
from enchtable_jax.converters.safety_vector import load_safety_vector, write_vector
from enchtable_jax.kernels import spectral
from enchtable_jax.merging import decomposition
from enchtable_jax.merging.methods import method_options
from enchtable_jax.merging.pipeline import merge
from enchtable_jax.merging.sources import SafetyDelta


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("world"), "tiny")


@pytest.fixture()
def world(built, tmp_path):
    """The tiny merge world with a fresh copy of its safety-vector folder (tests add cache files to it)."""
    return {**built, "vector": shutil.copytree(built["vector"], tmp_path / "vector")}


def _merge(world, out, **kw):
    return merge("enchtable", world["base"], world["task"], safety_vector=world["vector"], out=out, progress=False,
                 **kw)


def _tensors(folder):
    return dict(iter_tensors(index_weights(folder)))


def _cache_files(world):
    return sorted(p.name for p in world["vector"].glob("safety_svd.*"))


def test_first_merge_writes_the_decomposition_and_later_merges_read_it_with_the_same_bytes(world, tmp_path):
    plain = _merge(world, tmp_path / "plain", cache_decomposition=False)
    assert plain.report["safety_decomposition"]["state"].startswith("computed, not cached (disabled")
    assert _cache_files(world) == []
    first = _merge(world, tmp_path / "a")
    assert first.report["safety_decomposition"]["state"] == "written"
    assert len(_cache_files(world)) == 1
    second = _merge(world, tmp_path / "b")
    assert second.report["safety_decomposition"] == {"state": "read", "file": first.report["safety_decomposition"]
                                                     ["file"], "solver": "gram64"}  # "auto" on CPU
    a, b, c = _tensors(tmp_path / "a"), _tensors(tmp_path / "b"), _tensors(tmp_path / "plain")
    assert all(a[n].tobytes() == b[n].tobytes() == c[n].tobytes() for n in a)


@pytest.mark.parametrize("solver", ["svd", "gram64"])
def test_cached_triplets_are_the_float64_truncated_svd_of_the_vector(world, tmp_path, solver):
    _merge(world, tmp_path / "a", solver=solver)
    cache = decomposition.Cache(world["vector"], 0.5, solver)
    vector = load_safety_vector(world["vector"]).tensors
    matrices = {n: v.shape for n, v in vector.items() if v.ndim == 2}
    assert cache.covers(matrices)
    for name, shape in matrices.items():
        u, s, v = cache.read(name, shape)
        k = spectral.kept(shape, 0.5)
        assert u.shape == (shape[0], k) and v.shape == (shape[1], k)
        uu, ss, vvt = np.linalg.svd(vector[name].astype(np.float64), full_matrices=False)
        np.testing.assert_allclose(s, ss[:k], rtol=1e-5)
        truncated = (uu[:, :k] * ss[:k]) @ vvt[:k]
        np.testing.assert_allclose((u * s) @ v.T, truncated, atol=1e-5 * ss[0])


def test_an_edited_vector_is_not_served_the_old_decomposition(world, tmp_path):
    _merge(world, tmp_path / "a")
    old = _cache_files(world)
    stored = load_safety_vector(world["vector"])
    write_vector(world["vector"], {n: 2 * v for n, v in stored.tensors.items()},
                 {k: v for k, v in stored.manifest.items() if k not in ("format", "version")})
    edited = _merge(world, tmp_path / "b")
    assert edited.report["safety_decomposition"]["state"] == "written"
    assert len(_cache_files(world)) == 2 and old[0] in _cache_files(world)  # the old file is left as it was
    reference = _merge(world, tmp_path / "c")  # reads the new cache
    assert reference.report["safety_decomposition"]["state"] == "read"
    fresh = merge("enchtable", world["base"], world["task"], safety_vector=world["vector"], progress=False,
                  cache_decomposition=False, keep=0.5)
    b = _tensors(tmp_path / "b")
    assert all(np.array_equal(b[n], np.asarray(fresh.model.params[n])) for n in b)


def test_a_decomposition_kept_for_more_triplets_serves_fewer(world, tmp_path):
    _merge(world, tmp_path / "a")  # keep 0.5
    cached = _merge(world, tmp_path / "b", keep=0.25)
    assert cached.report["safety_decomposition"]["state"] == "read"
    fresh = merge("enchtable", world["base"], world["task"], safety_vector=world["vector"], progress=False,
                  keep=0.25, cache_decomposition=False)
    b = _tensors(tmp_path / "b")
    np.testing.assert_allclose([t["interference"] for t in cached.report["tensors"] if "interference" in t],
                               [t["interference"] for t in fresh.report["tensors"] if "interference" in t],
                               rtol=1e-5)
    assert all(np.allclose(b[n], np.asarray(fresh.model.params[n]), atol=1e-7) for n in b)


def test_each_exact_solver_has_its_own_cache_and_the_svds_keeps_its_old_name(world, tmp_path):
    """A cache written by one solver is never served to a merge by another (a merge's bytes would then depend on
    whether it was cached); the SVD's file keeps the name that earlier versions gave it."""
    digest = decomposition.Cache(world["vector"], 0.5).digest
    assert _merge(world, tmp_path / "a", solver="svd").report["safety_decomposition"]["state"] == "written"
    assert _cache_files(world) == [decomposition.file_name(0.5, digest)] == [f"safety_svd.keep-0.5.{digest[:16]}"
                                                                           ".safetensors"]
    assert _merge(world, tmp_path / "b").report["safety_decomposition"]["state"] == "written"  # auto: gram64
    assert _merge(world, tmp_path / "c", solver="svd").report["safety_decomposition"]["state"] == "read"
    assert _merge(world, tmp_path / "d", solver="gram64").report["safety_decomposition"]["state"] == "read"
    assert _cache_files(world) == sorted([decomposition.file_name(0.5, digest),
                                          decomposition.file_name(0.5, digest, "gram64")])
    b, d = _tensors(tmp_path / "b"), _tensors(tmp_path / "d")
    assert all(b[n].tobytes() == d[n].tobytes() for n in b)


def test_calibration_sweep_reads_the_cache_and_gives_the_same_weights(world, tmp_path):
    options = method_options("enchtable", {})
    before = EnchtableSweep(world["base"], world["task"], SafetyDelta(world["vector"]), options, progress=False)
    _merge(world, tmp_path / "a")
    after = EnchtableSweep(world["base"], world["task"], SafetyDelta(world["vector"]), options, progress=False)
    w0, w1 = before.weights(0.3), after.weights(0.3)
    assert w0.keys() == w1.keys() and len(w0) > 0
    np.testing.assert_allclose(list(w1.values()), list(w0.values()), rtol=1e-5)


def test_interference_of_a_low_rank_delta_ignores_its_null_space_basis():
    rng = np.random.default_rng(0)
    m, n, rank = 40, 30, 3
    task = rng.standard_normal((m, rank)) @ rng.standard_normal((rank, n)) * 0.1
    safety = rng.standard_normal((m, n)) * 0.05
    expected = iota64(task, safety, 0.5, 200.0)
    dense = float(spectral.interference(jnp.asarray(task, jnp.float32), jnp.asarray(safety, jnp.float32)))
    np.testing.assert_allclose(dense, expected, rtol=1e-4)
    # Another orthonormal completion of the null space (LAPACK's is arbitrary) gives the same ι.
    u, s, vt = np.linalg.svd(task, full_matrices=False)
    k = spectral.kept(task.shape, 0.5)
    draw = rng.standard_normal((m, k - rank))
    completion = np.linalg.qr(draw - u[:, :rank] @ (u[:, :rank].T @ draw))[0]  # orthonormal, ⟂ the column space
    u_other = np.hstack([u[:, :rank], completion])
    known = {"task": (jnp.asarray(u_other, jnp.float32), jnp.asarray(s[:k], jnp.float32),
                      jnp.asarray(vt[:k].T, jnp.float32))}
    other = float(spectral.interference(jnp.asarray(task, jnp.float32), jnp.asarray(safety, jnp.float32),
                                        known=known))
    np.testing.assert_allclose(other, expected, rtol=1e-4)
    np.testing.assert_allclose(float(spectral.interference_direct(jnp.asarray(task, jnp.float32),
                                                                   jnp.asarray(safety, jnp.float32))),
                               expected, rtol=1e-4)


def test_cli_stores_the_decomposition_unless_told_not_to(world, tmp_path):
    from enchtable_jax.cli import main

    args = ["merge", "--method", "enchtable", "--base", str(world["base"]), "--task", str(world["task"]),
            "--safety-vector", str(world["vector"])]
    assert main([*args, "--out", str(tmp_path / "a"), "--no-decomposition-cache"]) == 0
    assert _cache_files(world) == []
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    assert len(_cache_files(world)) == 1
    report = json.loads((tmp_path / "b" / "merge_report.json").read_text())
    assert report["safety_decomposition"]["state"] == "written"


def test_a_killed_merges_temporary_file_is_removed_by_the_next_write(world, tmp_path):
    """The cache is written as `.NAME.tmp-PID-XXXXXXXX` and renamed, like every output (converters/atomic.py): the
    temporary file of a merge killed mid-write (its process gone) is deleted when the next merge writes the file;
    one of a live process is left alone."""
    import subprocess
    import sys

    digest = decomposition.Cache(world["vector"], 0.5).digest
    name = decomposition.file_name(0.5, digest, "gram64")  # "auto" on CPU
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True).stdout.strip()
    killed = world["vector"] / f".{name}.tmp-{dead}-abcd1234"
    live = world["vector"] / f".{name}.tmp-{os.getpid()}-abcd1234"
    killed.write_bytes(b"half a file")
    live.write_bytes(b"being written")
    assert _merge(world, tmp_path / "a").report["safety_decomposition"]["state"] == "written"
    assert not killed.exists() and live.exists()
    assert _cache_files(world) == [name]
