"""Loading is safe (issue 15): no code from a folder runs, nothing is downloaded, no file outside the folder is
read, parsing is at least as strict as the formats, and every message names the file and the field."""

from __future__ import annotations

import ast
import builtins
import io
import json
import math
import os
import shutil
import socket
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import enchtable_jax
from enchtable_jax.converters import safetensors_format as stf
from enchtable_jax.converters.hf import index_weights, read_hf
from enchtable_jax.converters.safety_vector import FORMAT as VECTOR_FORMAT
from enchtable_jax.converters.safety_vector import MANIFEST, TENSORS, load_safety_vector, read_manifest
from enchtable_jax.errors import EnchtableError
from enchtable_jax.models.config import ConfigError, ModelConfig
from enchtable_jax.models.tokenizer import byte_level_tokenizer, load_tokenizer
from enchtable_jax.safe_io import UnsafePathError

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A tiny llama folder (single file, byte-level tokenizer), a sharded copy, and a lone tokenizer folder."""
    from enchtable_jax.models.init import init_params, preset_config

    root = tmp_path_factory.mktemp("loading")
    byte_level_tokenizer().save_pretrained(root / "tokenizer")
    config = preset_config("tiny", "llama")
    model = enchtable_jax.Model(config, init_params(config, seed=1))
    enchtable_jax.save(model, root / "single", like=root / "tokenizer")
    enchtable_jax.save(model, root / "sharded", like=root / "tokenizer", shard_size=60_000)
    assert (root / "sharded" / "model.safetensors.index.json").is_file()
    return root


@pytest.fixture
def copy(built, tmp_path):
    """copy(name) -> a private copy of one of the built folders, inside tmp_path/inside/."""

    def make(name: str) -> Path:
        dst = tmp_path / "inside" / name
        shutil.copytree(built / name, dst)
        return dst

    return make


@pytest.fixture
def outside(tmp_path) -> Path:
    """A folder beside the model folders, holding a valid safetensors file and a tokenizer.json."""
    folder = tmp_path / "outside"
    folder.mkdir()
    stf.write_file(folder / "other.safetensors", [("x", np.zeros(3, np.float32))], np.asarray, {"format": "pt"})
    byte_level_tokenizer().save_pretrained(folder / "tok")
    return folder


def _index(folder: Path) -> tuple[Path, dict]:
    path = folder / "model.safetensors.index.json"
    return path, json.loads(path.read_text())


def _first_shard(index: dict) -> str:
    return sorted(set(index["weight_map"].values()))[0]


# ---------------------------------------------------------------------------------- 3: no code from a folder runs

EVIL = """
import pathlib
pathlib.Path({marker!r}).write_text("ran")
from transformers import PreTrainedTokenizerFast
class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""


def _evil(folder: Path, marker: Path, config_name: str = "tokenizer_config.json") -> Path:
    """`folder`'s tokenizer asks for its own code (auto_map in `config_name`); importing it writes `marker`."""
    (folder / "evil.py").write_text(EVIL.format(marker=str(marker)))
    path = folder / config_name
    config = json.loads(path.read_text()) if path.is_file() else {}
    config["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", "evil.EvilTokenizer"]}
    if config_name == "config.json":
        tok = json.loads((folder / "tokenizer_config.json").read_text())
        tok.pop("tokenizer_class", None)
        (folder / "tokenizer_config.json").write_text(json.dumps(tok))
    path.write_text(json.dumps(config))
    return folder


@pytest.fixture
def no_prompt(monkeypatch):
    """Fails the test if anything prompts: input() raises, and stdin offers 'y' and records any read."""
    stdin = io.StringIO("y\ny\ny\n")

    def refuse(*args, **kwargs):
        raise AssertionError(f"something prompted: input{args}")

    monkeypatch.setattr(builtins, "input", refuse)
    monkeypatch.setattr(sys, "stdin", stdin)
    yield
    assert stdin.tell() == 0, "stdin was read"


@pytest.mark.parametrize("config_name", ["tokenizer_config.json", "config.json"])
def test_tokenizer_asking_for_its_code_is_refused(copy, tmp_path, no_prompt, config_name):
    folder = _evil(copy("tokenizer"), tmp_path / "marker", config_name)
    with pytest.raises(EnchtableError, match=rf"{config_name}: field auto_map asks to run Python code") as err:
        load_tokenizer(folder, "test")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "marker").exists()


def test_model_folder_asking_for_code_is_refused_by_generation(copy, tmp_path, no_prompt):
    from enchtable_jax.eval.generate import resolve_tokenizer

    folder = _evil(copy("single"), tmp_path / "marker")
    model = enchtable_jax.load(folder)
    with pytest.raises(EnchtableError, match="auto_map"):
        resolve_tokenizer(model)
    with pytest.raises(EnchtableError, match="auto_map"):
        resolve_tokenizer(model, str(folder))
    assert not (tmp_path / "marker").exists()


def test_remote_code_is_refused_in_a_process_whose_stdin_says_yes(copy, tmp_path):
    """The end-to-end case of the issue: a real process, stdin a pipe that answers 'y' to any prompt."""
    folder = _evil(copy("tokenizer"), tmp_path / "marker")
    code = ("import sys\nfrom enchtable_jax.models.tokenizer import load_tokenizer\n"
            "try:\n    load_tokenizer(sys.argv[1], 'test')\nexcept Exception as e:\n"
            "    print('REFUSED', type(e).__name__, e)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code, str(folder)], input="y\n" * 10, capture_output=True,
                          text=True, timeout=120, env=env)
    assert "REFUSED TokenizerError" in done.stdout, done.stdout + done.stderr
    assert "[y/N]" not in done.stdout + done.stderr
    assert not (tmp_path / "marker").exists()


def test_transformers_is_called_offline_and_without_remote_code(built, monkeypatch):
    import transformers

    seen = {}
    real = transformers.AutoTokenizer.from_pretrained

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", spy)
    assert load_tokenizer(built / "tokenizer", "test").encode("ab") == [97, 98]
    assert seen.get("trust_remote_code") is False and seen.get("local_files_only") is True


def _hf_calls() -> list[tuple[str, set[str]]]:
    """(file:line, keyword names) of every `from_pretrained` / hub-download call in the package."""
    calls = []
    for path in sorted((ROOT / "enchtable_jax").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "attr", getattr(node.func, "id", ""))
                if name in ("from_pretrained", "hf_hub_download", "snapshot_download", "cached_file"):
                    keywords = {k.arg for k in node.keywords}
                    for k in node.keywords:  # `**offline` where offline is a dict literal in the same function
                        if k.arg is None and isinstance(k.value, ast.Name):
                            keywords |= _dict_keys(path, k.value.id)
                    calls.append((f"{path.relative_to(ROOT)}:{node.lineno}", keywords))
    return calls


def _dict_keys(path: Path, variable: str) -> set[str]:
    keys = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict) and any(
                isinstance(t, ast.Name) and t.id == variable for t in node.targets):
            keys |= {k.value for k in node.value.keys if isinstance(k, ast.Constant)}
    return keys


def test_every_transformers_load_in_the_package_is_offline_and_runs_no_code():
    calls = _hf_calls()
    assert len(calls) >= 3  # load_tokenizer and the two GGUF loads
    bad = [where for where, keywords in calls if not {"trust_remote_code", "local_files_only"} <= keywords]
    assert not bad, f"calls without trust_remote_code=False and local_files_only=True: {bad}"


def test_gguf_conversion_never_reads_files_beside_the_gguf(tmp_path, monkeypatch):
    """transformers is handed a folder holding only the GGUF file: a config asking for code beside it is unseen."""
    pytest.importorskip("gguf")
    import transformers

    from enchtable_jax.converters import gguf

    (tmp_path / "m.gguf").write_bytes(b"GGUF" + b"\0" * 60)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["evil.E", None]}}))
    (tmp_path / "config.json").write_text(json.dumps({"auto_map": {"AutoConfig": "evil.C"}}))
    (tmp_path / "evil.py").write_text(f"open({str(tmp_path / 'marker')!r}, 'w')")
    seen = []

    def spy(folder, **kwargs):
        seen.append((sorted(os.listdir(folder)), kwargs))
        raise RuntimeError("stop here")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", spy)
    with pytest.raises(RuntimeError, match="stop here"):
        gguf.gguf_to_hf(tmp_path / "m.gguf", tmp_path / "out")
    ((listing, kwargs),) = seen
    assert listing == [kwargs["gguf_file"]]
    assert kwargs["trust_remote_code"] is False and kwargs["local_files_only"] is True


# ---------------------------------------------------------------------------------------- 8: nothing downloaded

@pytest.mark.parametrize("name", ["Qwen/Qwen2.5-0.5B-Instruct", "gpt2", "./no-such-folder", "hf://org/model"])
def test_tokenizer_name_that_is_not_a_local_folder_is_refused(name, monkeypatch, tmp_path):
    import transformers

    monkeypatch.chdir(tmp_path)

    def no_network(*args, **kwargs):
        raise AssertionError("network used")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_network)
    with pytest.raises(EnchtableError, match="not a local folder") as err:
        load_tokenizer(name, "test")
    assert name in str(err.value) and "\n" not in str(err.value)


def test_cli_eval_tokenizer_name_is_refused_with_one_line(built, tmp_path, capsys, monkeypatch):
    from enchtable_jax.cli import main

    monkeypatch.setattr(socket.socket, "connect", lambda *a, **k: pytest.fail("network used"))
    prompts = tmp_path / "p.json"
    prompts.write_text('["hello"]')
    code = main(["eval", "--model", str(built / "single"), "--tokenizer", "Qwen/Qwen2.5-0.5B-Instruct", "--prompts",
                 str(prompts), "--out", str(tmp_path / "eval"), "--max-new-tokens", "2"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "Qwen/Qwen2.5-0.5B-Instruct: not a local folder" in err and "Traceback" not in err


# -------------------------------------------------------------------------------- 4: nothing read outside the folder

@pytest.mark.parametrize("kind", ["dotdot", "absolute", "nested-dotdot"])
def test_index_shard_names_leaving_the_folder_are_refused(copy, outside, kind):
    folder = copy("sharded")
    path, index = _index(folder)
    target = {"dotdot": "../../outside/other.safetensors", "absolute": str(outside / "other.safetensors"),
              "nested-dotdot": "sub/../../../outside/other.safetensors"}[kind]
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = target
    path.write_text(json.dumps(index))
    with pytest.raises(UnsafePathError, match=rf"model.safetensors.index.json: field weight_map\['{name}'\]") as err:
        index_weights(folder)
    assert "\n" not in str(err.value)
    with pytest.raises(UnsafePathError):
        enchtable_jax.load(folder)


def test_index_shard_symlinked_outside_is_refused(copy, outside):
    folder = copy("sharded")
    _, index = _index(folder)
    shard = folder / _first_shard(index)
    shutil.copy(shard, outside / "moved.safetensors")
    shard.unlink()
    shard.symlink_to(outside / "moved.safetensors")
    with pytest.raises(UnsafePathError, match="outside the folder"):
        index_weights(folder)


def test_shard_name_through_a_symlinked_subfolder_opens_the_checked_path(copy):
    """`lnk/../../x` with lnk -> sub/deep resolves inside (folder/x); normpath would open folder/../x instead."""
    folder = copy("sharded")
    path, index = _index(folder)
    shard = _first_shard(index)
    (folder / "sub" / "deep").mkdir(parents=True)
    (folder / "lnk").symlink_to(Path("sub") / "deep")
    shutil.move(folder / shard, folder.parent / "secret.safetensors")  # outside the model folder
    index["weight_map"] = {k: "lnk/../../secret.safetensors" if v == shard else v
                           for k, v in index["weight_map"].items()}
    path.write_text(json.dumps(index))
    with pytest.raises(EnchtableError, match="secret.safetensors is listed but missing") as err:
        index_weights(folder)
    assert "\n" not in str(err.value)
    with pytest.raises(EnchtableError):
        enchtable_jax.load(folder)


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "model.safetensors.index.json"])
def test_fixed_files_symlinked_outside_are_refused(copy, outside, name):
    folder = copy("sharded" if name.endswith("index.json") else "single")
    shutil.move(folder / name, outside / name)
    (folder / name).symlink_to(outside / name)
    with pytest.raises(UnsafePathError, match=rf"{name}: is a symlink to .*outside the folder"):
        read_hf(folder)


def test_symlinks_inside_the_folder_and_the_hf_cache_layout_are_accepted(copy, tmp_path):
    """`repo/snapshots/REV/*` are symlinks into `repo/blobs/`: part of the same download, so they are read."""
    src = copy("sharded")
    repo = tmp_path / "models--org--tiny"
    snapshot = repo / "snapshots" / "0123abc"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, file in enumerate(sorted(src.iterdir())):
        shutil.copy(file, repo / "blobs" / f"blob{i}")
        (snapshot / file.name).symlink_to(Path("../../blobs") / f"blob{i}")
    model = enchtable_jax.load(snapshot)
    assert load_tokenizer(snapshot, "test").encode("a") == [97]
    # a shard name that takes a detour inside the folder is fine too
    path, index = _index(src)
    index["weight_map"] = {k: f"./sub/../{v}" for k, v in index["weight_map"].items()}
    path.write_text(json.dumps(index))
    again = enchtable_jax.load(src)
    assert all(np.array_equal(np.asarray(model.params[n]), np.asarray(again.params[n])) for n in model.params)


@pytest.mark.parametrize("case", ["dotdot", "absolute", "symlink"])
def test_tokenizer_files_outside_the_folder_are_refused(copy, outside, case):
    folder = copy("tokenizer")
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    if case == "symlink":
        (folder / "tokenizer.json").unlink()
        (folder / "tokenizer.json").symlink_to(outside / "tok" / "tokenizer.json")
        match = "tokenizer.json: is a symlink"
    else:
        config["tokenizer_file"] = ("../../outside/tok/tokenizer.json" if case == "dotdot"
                                    else str(outside / "tok" / "tokenizer.json"))
        config_path.write_text(json.dumps(config))
        match = "tokenizer_config.json: field tokenizer_file"
    with pytest.raises(UnsafePathError, match=match):
        load_tokenizer(folder, "test")


def _vector(folder: Path) -> Path:
    folder.mkdir(parents=True)
    stf.write_file(folder / TENSORS, [("w", np.ones((2, 2), np.float32))], np.asarray, {"format": "pt"})
    (folder / MANIFEST).write_text(json.dumps({"format": VECTOR_FORMAT, "version": 1, "base_model": {}}))
    return folder


@pytest.mark.parametrize("name", [TENSORS, MANIFEST])
def test_safety_vector_files_symlinked_outside_are_refused(tmp_path, outside, name):
    from enchtable_jax.merging.sources import SafetyDelta

    folder = _vector(tmp_path / "vector")
    assert load_safety_vector(folder).tensors["w"].sum() == 4
    shutil.move(folder / name, outside / name)
    (folder / name).symlink_to(outside / name)
    for read in (load_safety_vector, lambda f: SafetyDelta(vector=f), read_manifest):
        if read is read_manifest and name == TENSORS:
            continue
        with pytest.raises(UnsafePathError, match=f"{name}: is a symlink"):
            read(folder)


def test_orbax_checkpoint_with_a_file_symlinked_outside_is_refused(built, tmp_path, outside):
    model = enchtable_jax.load(built / "single")
    ckpt = enchtable_jax.save_orbax(model, tmp_path / "ckpt")
    victim = next(p for p in sorted((ckpt / "params").rglob("*")) if p.is_file())
    shutil.move(victim, outside / "stolen")
    victim.symlink_to(outside / "stolen")
    with pytest.raises(UnsafePathError, match="outside the folder"):
        enchtable_jax.load(ckpt)


def test_companion_files_symlinked_outside_are_not_copied(built, copy, tmp_path, outside):
    src = copy("tokenizer")
    (outside / "secret.txt").write_text("secret")
    (src / "notes.txt").symlink_to(outside / "secret.txt")
    model = enchtable_jax.load(built / "single")
    with pytest.raises(UnsafePathError, match="notes.txt: is a symlink"):
        enchtable_jax.save(model, tmp_path / "out", like=src)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------- 14 and 15: strict, and errors that name

def _config(tmp_path: Path, **fields) -> Path:
    raw = {"model_type": "llama", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
           "num_hidden_layers": 2, "num_attention_heads": 2, **fields}
    path = tmp_path / "config.json"
    path.write_text(json.dumps({k: v for k, v in raw.items() if v != "DROP"}))
    return path


@pytest.mark.parametrize("field, value", [
    ("num_hidden_layers", True), ("num_hidden_layers", 2.0), ("num_hidden_layers", "2"), ("vocab_size", -1),
    ("hidden_size", False), ("num_key_value_heads", True), ("head_dim", 0), ("head_dim", 8.5),
    ("rms_norm_eps", "tiny"), ("rms_norm_eps", 0), ("rms_norm_eps", -1e-6), ("rms_norm_eps", True),
    ("rope_theta", "big"), ("rope_theta", 0), ("tie_word_embeddings", "yes"),
    ("tie_word_embeddings", 1), ("attention_bias", "false"), ("mlp_bias", 0), ("hidden_act", ["silu"]),
    ("model_type", ["llama"]),
])
def test_config_fields_are_type_checked_and_named(tmp_path, field, value):
    path = _config(tmp_path, **{field: value})
    with pytest.raises(ConfigError, match=rf"{path}: field '{field}'") as err:
        ModelConfig.from_file(path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("fields, named", [
    (dict(rope_scaling={"rope_type": "linear", "factor": "2"}), "rope_scaling.factor"),
    (dict(rope_scaling={"rope_type": "linear", "factor": -2.0}), "rope_scaling.factor"),
    (dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": True, "high_freq_factor": 4.0}),
     "rope_parameters.low_freq_factor"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "original_max_position_embeddings": -5}),
     "rope_parameters.original_max_position_embeddings"),
    (dict(rope_scaling=[1, 2]), "rope_scaling"),
    (dict(model_type="mistral", sliding_window=-1), "sliding_window"),
    (dict(model_type="qwen2", sliding_window=True), "sliding_window"),
    (dict(model_type="qwen2", use_sliding_window="yes"), "use_sliding_window"),
    (dict(model_type="qwen2", use_sliding_window=True, max_window_layers="1"), "max_window_layers"),
    (dict(model_type="qwen2", use_sliding_window=True, sliding_window=64, max_window_layers=1), None),
    (dict(model_type="mistral", sliding_window=None), None),
])
def test_nested_config_fields_are_named(tmp_path, fields, named):
    path = _config(tmp_path, **fields)
    if named is None:  # a valid config stays valid
        ModelConfig.from_file(path)
        return
    with pytest.raises(ConfigError, match=rf"field '?{named}'?"):
        ModelConfig.from_file(path)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_config_floats_are_refused(value):
    raw = json.loads(_config_text(rms_norm_eps=1e-6))
    for field in ("rms_norm_eps", "rope_theta"):
        with pytest.raises(ConfigError, match=f"x.json: field '{field}' must be a finite positive number"):
            ModelConfig.from_hf({**raw, field: value}, source="x.json")


def _config_text(**fields) -> str:
    raw = {"model_type": "llama", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
           "num_hidden_layers": 2, "num_attention_heads": 2, **fields}
    return json.dumps(raw)


def test_config_accepts_what_hf_writes(tmp_path):
    config = ModelConfig.from_file(_config(tmp_path, rms_norm_eps=1e-5, rope_theta=500000, tie_word_embeddings=True,
                                           rope_scaling={"rope_type": "llama3", "factor": 8, "low_freq_factor": 1,
                                                         "high_freq_factor": 4,
                                                         "original_max_position_embeddings": 8192}))
    assert config.rope_theta == 500000.0 and config.rope.factor == 8.0 and config.tie_word_embeddings is True


@pytest.mark.parametrize("content, match", [
    (b'{"model_type": "llama", "x": "\xff\xfe"}', "not UTF-8 text"),
    (b"[1, 2]", "must hold a JSON object"),
    (b'{"model_type": "llama"', "not valid JSON"),
    (b'{"model_type": "llama", "rms_norm_eps": NaN}', "NaN is not JSON"),
    (b'{"model_type": "llama", "model_type": "qwen2"}', "appears twice"),
])
def test_unreadable_json_names_the_file(copy, content, match):
    folder = copy("sharded")
    for name in ("config.json", "model.safetensors.index.json"):
        before = (folder / name).read_bytes()
        (folder / name).write_bytes(content)
        with pytest.raises(EnchtableError, match=match) as err:
            enchtable_jax.load(folder)
        assert str(folder / name) in str(err.value) and "\n" not in str(err.value)
        (folder / name).write_bytes(before)


@pytest.mark.parametrize("weight_map, field", [
    ([], "weight_map"), ({}, "weight_map"), ("model.safetensors", "weight_map"),
    ({"model.embed_tokens.weight": 5}, "weight_map['model.embed_tokens.weight']"),
    ({"model.embed_tokens.weight": ""}, "weight_map['model.embed_tokens.weight']"),
    ({"model.embed_tokens.weight": "config.json"}, "weight_map['model.embed_tokens.weight']"),
])
def test_index_fields_are_checked_and_named(copy, weight_map, field):
    folder = copy("sharded")
    path, index = _index(folder)
    index["weight_map"] = weight_map
    path.write_text(json.dumps(index))
    with pytest.raises(EnchtableError, match=rf"{path}: field {__import__('re').escape(field)}"):
        index_weights(folder)


def test_tokenizer_config_that_is_not_json_is_named(copy):
    folder = copy("tokenizer")
    (folder / "tokenizer_config.json").write_bytes(b"\xff{")
    with pytest.raises(EnchtableError, match=r"tokenizer_config.json: not UTF-8"):
        load_tokenizer(folder, "test")


def test_invalid_manifest_names_the_file(tmp_path):
    folder = _vector(tmp_path / "vector")
    (folder / MANIFEST).write_bytes(b"\xff\xfe")
    with pytest.raises(EnchtableError, match=rf"{folder / MANIFEST}"):
        read_manifest(folder)


# ------------------------------------------------------------- 15: safetensors, with the `safetensors` package as oracle

def _file(header: dict | list | bytes, data: bytes = b"", n: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if n is None else n) + raw + data


F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
CRAFTED = {
    "overlap": _file({"a": F32x2, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12)),
    "same span": _file({"a": F32x2, "b": F32x2}, bytes(8)),
    "gap": _file({"a": F32x2, "b": {"dtype": "F32", "shape": [2], "data_offsets": [12, 20]}}, bytes(20)),
    "not from zero": _file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, bytes(16)),
    "trailing bytes": _file({"a": F32x2}, bytes(9)),
    "negative shape": _file({"a": {"dtype": "F32", "shape": [-2, -1], "data_offsets": [0, 8]}}, bytes(8)),
    "overflowing shape": _file({"a": {"dtype": "F32", "shape": [2 ** 32, 2 ** 32, 2 ** 32], "data_offsets": [0, 0]}}),
    "overflow to size": _file({"a": {"dtype": "U8", "shape": [2 ** 64], "data_offsets": [0, 0]}}),
    "float shape": _file({"a": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}, bytes(8)),
    "bool shape": _file({"a": {"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}}, bytes(8)),
    "shape not a list": _file({"a": {"dtype": "F32", "shape": 2, "data_offsets": [0, 8]}}, bytes(8)),
    "bad dtype": _file({"a": {"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)),
    "dtype not a string": _file({"a": {"dtype": 4, "shape": [2], "data_offsets": [0, 8]}}, bytes(8)),
    "size mismatch": _file({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8)),
    "reversed offsets": _file({"a": {"dtype": "F32", "shape": [0], "data_offsets": [8, 0]}}, bytes(8)),
    "three offsets": _file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 8]}}, bytes(8)),
    "negative offset": _file({"a": {"dtype": "U8", "shape": [8], "data_offsets": [-8, 0]}}, bytes(8)),
    "missing dtype": _file({"a": {"shape": [2], "data_offsets": [0, 8]}}, bytes(8)),
    "entry not an object": _file({"a": [1, 2]}, bytes(8)),
    "truncated data": _file({"a": F32x2}, bytes(5)),
    "truncated header": _file({"a": F32x2}, n=200)[:60],
    "header length beyond the file": _file({"a": F32x2}, bytes(8), n=10 ** 6),
    "huge header length": _file({"a": F32x2}, bytes(8), n=2 ** 63),
    "header a list": _file([1, 2, 3]),
    "header a string": _file(b'"abc"'),
    "header not UTF-8": _file(b'{"\xff": 1}'),
    "header not JSON": _file(b"{not json}"),
    "metadata not str": _file({"__metadata__": {"format": 1}, "a": F32x2}, bytes(8)),
    "metadata a list": _file({"__metadata__": ["pt"], "a": F32x2}, bytes(8)),
    "seven bytes": b"\x01\x00\x00\x00\x00\x00\x00",
    "empty": b"",
}
VALID = {
    "plain": _file({"__metadata__": {"format": "pt"}, "a": F32x2}, bytes(8)),
    "two in either order": _file({"b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}, "a": F32x2},
                                 bytes(16)),
    "zero-size tensor": _file({"z": {"dtype": "BF16", "shape": [0, 4], "data_offsets": [0, 0]}, "a": F32x2},
                              bytes(8)),
    "scalar": _file({"s": {"dtype": "F64", "shape": [], "data_offsets": [0, 8]}}, bytes(8)),
    "padded header": _file(json.dumps({"a": F32x2}).encode() + b"    ", bytes(8)),
    "no tensors": _file({}),
}


def _oracle_refuses(path: Path) -> bool:
    safetensors = pytest.importorskip("safetensors")
    try:
        with safetensors.safe_open(str(path), framework="numpy") as f:
            for name in f.keys():
                f.get_slice(name)
    except Exception:  # noqa: BLE001 - the oracle's own error types vary between versions
        return True
    return False


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_safetensors_files_the_package_refuses_are_refused(tmp_path, case):
    path = tmp_path / "x.safetensors"
    path.write_bytes(CRAFTED[case])
    assert _oracle_refuses(path), f"crafted case {case!r} is accepted by the safetensors package"
    with pytest.raises(stf.SafetensorsError) as err:
        stf.read_header(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("case", sorted(VALID))
def test_valid_safetensors_files_are_read_like_the_package_reads_them(tmp_path, case):
    safetensors = pytest.importorskip("safetensors.numpy")
    path = tmp_path / "x.safetensors"
    path.write_bytes(VALID[case])
    assert not _oracle_refuses(path)
    infos, _ = stf.read_header(path)
    expected = safetensors.load_file(str(path)) if case not in ("zero-size tensor",) else None
    with open(path, "rb") as f:
        ours = {name: stf.read_tensor(f, info) for name, info in infos.items()}
    if expected is not None:
        assert set(ours) == set(expected)
        for name in ours:
            assert ours[name].shape == expected[name].shape and ours[name].tobytes() == expected[name].tobytes()
    assert all(math.prod(i.shape) * i.dtype.itemsize == i.nbytes for i in infos.values())


@pytest.mark.parametrize("shape", [[0, 2 ** 32, 2 ** 32], [0, 2 ** 63], [1] * 40])
def test_shapes_numpy_cannot_hold_are_refused_not_crashed(tmp_path, shape):
    """Found by the fuzz: a zero-size tensor with huge other dimensions passed the byte check, then numpy raised."""
    path = tmp_path / "x.safetensors"
    path.write_bytes(_file({"a": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0 if 0 in shape else 4]}},
                           bytes(0 if 0 in shape else 4)))
    with pytest.raises(stf.SafetensorsError, match="tensor 'a'"):
        stf.read_header(path)
