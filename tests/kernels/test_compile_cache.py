"""JAX's persistent compilation cache (kernels/compile_cache.py): pointed at the user cache folder when asked or where
the TPU runtime is installed, never over a folder the user chose, and a fresh process then writes compiled programs
there."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import pytest

from enchtable_jax.kernels import compile_cache


@pytest.fixture
def no_cache_dir():
    """The process's cache folder unset for the test and put back after (it is process-wide JAX state)."""
    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", None)
    yield
    jax.config.update("jax_compilation_cache_dir", before)


def test_asked_for_it_uses_the_user_cache_folder(no_cache_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    folder = tmp_path / "xdg" / "enchtable-jax" / "jax-compilation-cache"
    assert compile_cache.default_cache_dir() == folder
    assert compile_cache.use_compilation_cache() == folder and folder.is_dir()
    assert jax.config.jax_compilation_cache_dir == str(folder)


def test_a_folder_the_user_chose_is_kept(no_cache_dir, tmp_path):
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "mine"))
    assert compile_cache.use_compilation_cache(tmp_path / "ours") is None
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "mine") and not (tmp_path / "ours").exists()


@pytest.mark.parametrize("tpu", [False, True])
def test_turned_on_by_itself_only_where_the_tpu_runtime_is(no_cache_dir, tmp_path, monkeypatch, tpu):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(compile_cache, "tpu_runtime_installed", lambda: tpu)
    assert (compile_cache.use_compilation_cache_on_tpu() is not None) == tpu
    assert (jax.config.jax_compilation_cache_dir is not None) == tpu


_FRESH = """
import os, sys
import enchtable_jax, jax, jax.numpy as jnp
enchtable_jax.use_compilation_cache(sys.argv[1])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.jit(lambda x: jnp.linalg.svd(x)[1])(jnp.ones((8, 4))).block_until_ready()
"""


@pytest.mark.slow  # a fresh process, ~5 s
def test_a_fresh_process_writes_its_compiled_programs_there(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    subprocess.run([sys.executable, "-c", _FRESH, str(tmp_path)], env=env, check=True, timeout=120)
    assert any(name.startswith("jit__lambda") for name in os.listdir(tmp_path))
