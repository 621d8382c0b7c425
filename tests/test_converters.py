"""HF folders, `.bin` checkpoints and orbax checkpoints <-> `enchtable_jax.load` / `save`.

Every check is against an independent oracle: the `safetensors` package (raw tensor bytes and file
metadata), transformers `from_pretrained` (what it loads and the logits it computes) and torch.
Models are tiny (about 100k parameters) and built once per module.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
import transformers
from conftest import make_hf_model
from oracles import raw_tensors, torch_raw
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from safetensors import safe_open

import enchtable_jax
from enchtable_jax.converters import OutputExistsError, SafetensorsError, UnsafeCheckpointError
from enchtable_jax.converters import safetensors_format as stf
from enchtable_jax.converters.hf import HFWriter, parse_size, write_hf
from enchtable_jax.models import init_params, preset_config

TOKENIZER_FILES = {
    "tokenizer_config.json": json.dumps({"model_max_length": 256, "chat_template": None}) + "\n",
    "chat_template.jinja": "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}",
}


# --------------------------------------------------------------------------------------------------------------
# Oracles and helpers


def jax_raw(arr) -> tuple[str, tuple[int, ...], bytes]:
    host = np.asarray(jax.device_get(arr))
    return host.dtype.name, tuple(host.shape), host.tobytes()


def params_raw(params) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    return {name: jax_raw(arr) for name, arr in params.items()}


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden ones included) with its content: 'nothing was written' means equal."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"<dir>" for p in sorted(folder.rglob("*"))}


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def add_tokenizer_files(folder: Path) -> None:
    for name, text in TOKENIZER_FILES.items():
        (folder / name).write_text(text)


def rewrite_weights(folder: Path, edit) -> None:
    """Load model.safetensors with the safetensors package, apply edit(dict), save it back."""
    file = folder / "model.safetensors"
    tensors = safetensors.torch.load_file(file)
    edit(tensors)
    safetensors.torch.save_file(tensors, file, metadata={"format": "pt"})


IDS = torch.tensor([[1, 5, 99, 42, 7, 0, 3, 64], [2, 2, 17, 100, 50, 8, 9, 11]])


def torch_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def from_pretrained(folder: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(folder).eval()


# --------------------------------------------------------------------------------------------------------------
# Shared tiny models (built once; tests that change a folder work on a copy)

VARIANTS = {
    "llama-f32": dict(model_type="llama", dtype="float32"),
    "llama-bf16": dict(model_type="llama", dtype="bfloat16"),
    "llama-tied": dict(model_type="llama", dtype="float32", tie_word_embeddings=True),
    "qwen2-bf16": dict(model_type="qwen2", dtype="bfloat16"),  # q/k/v biases
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{variant: (folder, torch model)}; folders must not be modified."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for seed, (name, kw) in enumerate(VARIANTS.items()):
        out[name] = (root / name, make_hf_model(root / name, seed=seed, **kw))
    return out


@pytest.fixture
def f32(models, tmp_path):
    """A private copy of the float32 llama folder, and its torch model."""
    folder, torch_model = models["llama-f32"]
    return copy_model(folder, tmp_path / "src"), torch_model


# --------------------------------------------------------------------------------------------------------------
# 1. HF -> load -> save -> transformers


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_round_trip_hf_is_byte_identical_and_loads_in_transformers(models, tmp_path, variant):
    folder, torch_model = models[variant]
    src = copy_model(folder, tmp_path / "src")
    add_tokenizer_files(src)
    original = raw_tensors(src)

    model = enchtable_jax.load(src)
    assert params_raw(model.params) == original  # read exactly as stored, dtype kept
    assert model.config.tie_word_embeddings == (variant == "llama-tied")
    if variant == "llama-tied":
        assert "lm_head.weight" not in model.params

    out = enchtable_jax.save(model, tmp_path / "out")
    assert out == (tmp_path / "out").resolve()
    assert raw_tensors(out) == original
    for file in out.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            assert f.metadata() == {"format": "pt"}
    assert json.loads((out / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    for name in [*TOKENIZER_FILES, "generation_config.json"]:
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    assert not list(tmp_path.glob(".out.*")), "temporary folder left behind"

    reloaded = from_pretrained(out)
    assert reloaded.dtype == torch_model.dtype
    assert reloaded.config.tie_word_embeddings == torch_model.config.tie_word_embeddings
    expected_state = {k: torch_raw(v) for k, v in torch_model.state_dict().items()}
    assert {k: torch_raw(v) for k, v in reloaded.state_dict().items()} == expected_state
    # The oracle is the source folder loaded the same way (the fixture's model, cast after creation, keeps
    # non-persistent buffers such as rotary inv_freq in its own dtype, which changes bf16 logits).
    assert torch.equal(torch_logits(reloaded), torch_logits(from_pretrained(src)))


def test_like_folder_copies_companion_files_only(f32, tmp_path):
    src, _ = f32
    like = tmp_path / "like"
    like.mkdir()
    companions = {**TOKENIZER_FILES, "special_tokens_map.json": '{"eos_token": "</s>"}',
                  "tokenizer.json": '{"version": "1.0"}', "generation_config.json": '{"eos_token_id": 2, "x": 1}'}
    for name, text in companions.items():
        (like / name).write_text(text)
    junk = ["model.safetensors", "model-00001-of-00002.safetensors", "model.safetensors.index.json",
            "pytorch_model.bin", "pytorch_model.bin.index.json", "config.json", "enchtable.json", ".hidden",
            # records of how the source was made: a new model must not inherit them
            "finetune.json", "loss.png", "merge_report.json", "merge_report.png", "calibration.json", "calibration.png"]
    for name in junk:
        (like / name).write_bytes(b"not for copying")
    (like / "subfolder").mkdir()

    model = enchtable_jax.load(src)
    out = enchtable_jax.save(model, tmp_path / "out", like=like)
    expected_files = {*companions, "config.json", "model.safetensors"}
    assert {p.name for p in out.iterdir()} == expected_files
    for name, text in companions.items():
        assert (out / name).read_text() == text
    assert (out / "config.json").read_bytes() != b"not for copying"
    assert raw_tensors(out) == raw_tensors(src)


def test_like_folder_missing_writes_nothing(f32, tmp_path):
    src, _ = f32
    model = enchtable_jax.load(src)
    before = snapshot(tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        enchtable_jax.save(model, tmp_path / "out", like=tmp_path / "nowhere")
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------------------------------------------
# 2. Sharded writes


@pytest.mark.parametrize("shard_size", [100_000, "100KB"])
def test_sharded_write(models, tmp_path, shard_size):
    folder, torch_model = models["llama-f32"]
    original = raw_tensors(folder)
    model = enchtable_jax.load(folder)
    out = enchtable_jax.save(model, tmp_path / "out", shard_size=shard_size)

    shards = sorted(out.glob("*.safetensors"))
    n = len(shards)
    assert n > 3
    assert [s.name for s in shards] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    held = {}
    for shard in shards:
        with safe_open(shard, "pt") as f:
            assert f.metadata() == {"format": "pt"}, shard.name
            names = list(f.keys())
            sizes = [f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in names]
        assert len(names) == 1 or sum(sizes) <= 100_000, (shard.name, sizes)
        held.update({name: shard.name for name in names})
    assert index["weight_map"] == held
    assert set(held) == set(original)
    assert index["metadata"]["total_size"] == sum(len(raw) for _, _, raw in original.values())
    assert raw_tensors(out) == original

    reloaded = from_pretrained(out)
    assert torch.equal(torch_logits(reloaded), torch_logits(from_pretrained(folder)))
    back = enchtable_jax.load(out)
    assert list(back.params) == list(model.params)
    assert params_raw(back.params) == original


@pytest.mark.parametrize("shard_size", [100_000, 20_000])
def test_shards_are_those_save_pretrained_writes(models, tmp_path, shard_size):
    """Same files, weight map and total size as transformers' `save_pretrained` given the tensors in the same
    order. At 20 kB the projections (24.6 kB) are each larger than a shard: each gets a shard of its own, numbered
    before the shard that was filling when it came."""
    folder, torch_model = models["llama-f32"]
    model = enchtable_jax.load(folder)
    out = enchtable_jax.save(model, tmp_path / "out", shard_size=shard_size)
    state = torch_model.state_dict()
    torch_model.save_pretrained(tmp_path / "hf", max_shard_size=shard_size,
                                state_dict={name: state[name] for name in model.params})
    ours, theirs = (json.loads((f / "model.safetensors.index.json").read_text()) for f in (out, tmp_path / "hf"))
    assert ours["weight_map"] == theirs["weight_map"]
    assert ours["metadata"]["total_size"] == theirs["metadata"]["total_size"]
    files = [sorted(p.name for p in folder.glob("*.safetensors")) for folder in (out, tmp_path / "hf")]
    assert files[0] == files[1]
    assert raw_tensors(out) == raw_tensors(tmp_path / "hf")


def test_a_producer_streams_into_shards_numbered_out_of_order(f32, tmp_path):
    """HFWriter: tensors added in the declared order while a shard of their own for large tensors keeps an
    earlier-begun shard open; the files hold exactly the added bytes."""
    src, _ = f32
    model = enchtable_jax.load(src)
    descriptors = {name: jax.ShapeDtypeStruct(arr.shape, arr.dtype) for name, arr in model.params.items()}
    with HFWriter(tmp_path / "out", model.config, descriptors, shard_size=20_000) as writer:
        for name, arr in model.params.items():
            writer.add(name, np.asarray(arr))
    out = writer.path
    files = [json.loads((out / "model.safetensors.index.json").read_text())["weight_map"][n] for n in model.params]
    assert files != sorted(files)  # some tensor went to a file numbered before the previous tensor's file
    assert raw_tensors(out) == raw_tensors(src)


# sha256 over (name, bytes) of every file of the folder `_golden_inputs` gives, as write_hf wrote it before HFWriter
# existed (commit 96503f6: config and tokenizer file, five shards, one a tensor larger than the shard size, index).
GOLDEN_SHA256 = "d977c871f86d8af258fc0c9b691f98f17ff1f22ff10cb7648a9f46531bd6ae8b"  # config.json lists the biases


def _golden_inputs(root: Path):
    """A 2-layer model of float32 and (MLP) bfloat16 tensors with fixed values, and a reference folder."""
    config = preset_config("tiny", num_hidden_layers=2, hidden_size=32, intermediate_size=48, vocab_size=300)
    rng = np.random.default_rng(7)
    params = {}
    for name, value in init_params(config, seed=0).items():
        arr = rng.standard_normal(value.shape, np.float32)
        params[name] = jnp.asarray(arr.astype(ml_dtypes.bfloat16) if "mlp" in name else arr)
    (root / "like").mkdir()
    (root / "like" / "tokenizer_config.json").write_text('{"model_max_length": 64}\n')
    return config, params, root / "like"


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for file in sorted(folder.iterdir()):
        h.update(file.name.encode() + b"\0" + file.read_bytes())
    return h.hexdigest()


def test_writer_writes_the_bytes_written_before_it_in_any_order(tmp_path):
    config, params, like = _golden_inputs(tmp_path)
    whole = write_hf(tmp_path / "whole", config, params, like=like, shard_size=20_000, progress=False)
    specs = {n: jax.ShapeDtypeStruct(v.shape, v.dtype) for n, v in params.items()}
    with HFWriter(tmp_path / "streamed", config, specs, like=like, shard_size=20_000, progress=False) as writer:
        for name in reversed(params):  # the last tensor of each shard first: written at its offset all the same
            writer.add(name, params[name])
    assert _digest(whole) == _digest(writer.path) == GOLDEN_SHA256


def test_writer_adds_files_and_refuses_its_own(f32, tmp_path):
    src, _ = f32
    model = enchtable_jax.load(src)
    with HFWriter(tmp_path / "out", model.config, model.params, shard_size=20_000, progress=False) as writer:
        for name in ("config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors", "../x",
                     ".hidden", ""):
            with pytest.raises(enchtable_jax.errors.EnchtableError, match="cannot add a file"):
                writer.add_file(name, b"x")
        writer.add_file("notes.txt", "héllo\n")
        writer.add_file("generation_config.json", b'{"do_sample": true}')
        for name, arr in model.params.items():
            writer.add(name, arr)
        assert not writer.path.exists()  # published at the end only
    assert (writer.path / "notes.txt").read_text(encoding="utf-8") == "héllo\n"
    assert (writer.path / "generation_config.json").read_bytes() == b'{"do_sample": true}'  # not replaced
    assert raw_tensors(writer.path) == raw_tensors(src)


@pytest.mark.parametrize("mistake, message", [
    (lambda w, p: w.add("model.nope", np.zeros(3, np.float32)), "tensor model.nope was not declared"),
    (lambda w, p: [w.add(n, p[n]) for n in list(p)[:1] * 2], "already written"),
    (lambda w, p: w.add("model.norm.weight", np.zeros(5, np.float32)), "declared as float32 \\(64,\\)"),
    (lambda w, p: w.add("model.norm.weight", np.asarray(p["model.norm.weight"], np.float64)), "declared as"),
    (lambda w, p: [w.add(n, a) for n, a in list(p.items())[:-1]], "1 declared tensor\\(s\\) were never added"),
    (lambda w, p: w.add("model.norm.weight", np.full(64, np.nan, np.float32)), "NaN"),
])
def test_writer_mistakes_publish_nothing(f32, tmp_path, mistake, message):
    src, _ = f32
    model = enchtable_jax.load(src)
    before = snapshot(tmp_path)
    with pytest.raises(enchtable_jax.errors.EnchtableError, match=message):
        with HFWriter(tmp_path / "out", model.config, model.params, shard_size=20_000, progress=False) as writer:
            mistake(writer, model.params)
    assert snapshot(tmp_path) == before  # no folder, no staging folder
    with pytest.raises(enchtable_jax.errors.EnchtableError, match="closed"):
        writer.add("model.norm.weight", model.params["model.norm.weight"])


def test_writer_abort_removes_its_staging_folder(f32, tmp_path):
    src, _ = f32
    model = enchtable_jax.load(src)
    writer = HFWriter(tmp_path / "out", model.config, model.params, progress=False)
    writer.add("model.norm.weight", model.params["model.norm.weight"])
    assert [p.name.startswith(".out.tmp-") for p in tmp_path.glob(".out*")] == [True]
    writer.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.mark.parametrize("text, expected", [
    ("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("2GiB", 2 * 2**30), ("10KB", 10_000), ("3MiB", 3 * 2**20),
    ("1.5GB", 1_500_000_000), (" 7 gb ", 7 * 10**9), ("4096", 4096), (123, 123), ("1T", 10**12)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "GB", "5XB", "-1", "-5GB", "0", "0MB", 0, -3, "5 G B", "1e9"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match="shard size"):
        parse_size(text)


@pytest.mark.parametrize("text", ["5iB", "5i"])
def test_parse_size_rejects_bare_i_unit(text):
    with pytest.raises(ValueError, match="shard size"):
        parse_size(text)


def test_bad_shard_size_writes_nothing(f32, tmp_path):
    src, _ = f32
    model = enchtable_jax.load(src)
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match="lots"):
        enchtable_jax.save(model, tmp_path / "out", shard_size="lots")
    assert snapshot(tmp_path) == before


# --------------------------------------------------------------------------------------------------------------
# 3. Our safetensors reader / writer vs the safetensors package


def read_ours(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    infos, metadata = stf.read_header(path)
    with open(path, "rb") as f:
        return {name: stf.read_tensor(f, info) for name, info in infos.items()}, metadata


def numpy_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "f64": rng.standard_normal((3, 5)),
        "f32": rng.standard_normal((4, 3, 2)).astype(np.float32),
        "f16": rng.standard_normal(7).astype(np.float16),
        "i64": rng.integers(-2**62, 2**62, (2, 3), dtype=np.int64),
        "i32": rng.integers(-2**31, 2**31 - 1, 9, dtype=np.int32),
        "i16": rng.integers(-2**15, 2**15 - 1, (3, 1), dtype=np.int16),
        "i8": rng.integers(-128, 127, 11, dtype=np.int8),
        "u8": rng.integers(0, 255, (2, 2, 2), dtype=np.uint8),
        "bool": rng.random(6) > 0.5,
        "scalar": np.array(3.25, np.float32),
        "empty": np.zeros((0,), np.float32),
        "empty2d": np.zeros((2, 0, 3), np.int32),
    }


def test_read_files_written_by_safetensors_numpy(tmp_path):
    tensors = numpy_tensors()
    path = tmp_path / "np.safetensors"
    safetensors.numpy.save_file(tensors, path, metadata={"format": "np", "note": "x"})
    ours, metadata = read_ours(path)
    assert metadata == {"format": "np", "note": "x"}
    assert set(ours) == set(tensors)
    for name, expected in tensors.items():
        assert ours[name].dtype == expected.dtype, name
        assert ours[name].shape == expected.shape, name
        assert ours[name].tobytes() == expected.tobytes(), name


def torch_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "bf16": torch.randn(5, 3, generator=g).to(torch.bfloat16),
        "bf16_scalar": torch.tensor(-1.5, dtype=torch.bfloat16),
        "bf16_empty": torch.zeros(0, 4, dtype=torch.bfloat16),
        "f8_e4m3": torch.randn(8, generator=g).to(torch.float8_e4m3fn),
        "f8_e5m2": torch.randn(2, 3, generator=g).to(torch.float8_e5m2),
        "f16": torch.randn(6, generator=g).to(torch.float16),
        "f32": torch.randn(2, 2, generator=g),
        "i64": torch.arange(-5, 5),
    }


def test_read_files_written_by_safetensors_torch(tmp_path):
    tensors = torch_tensors()
    path = tmp_path / "pt.safetensors"
    safetensors.torch.save_file(tensors, path, metadata={"format": "pt"})
    ours, metadata = read_ours(path)
    assert metadata == {"format": "pt"}
    assert {n: (a.dtype.name, a.shape, a.tobytes()) for n, a in ours.items()} == {
        n: torch_raw(t) for n, t in tensors.items()}
    assert ours["bf16"].dtype == np.dtype(ml_dtypes.bfloat16)


def test_files_written_by_us_read_by_safetensors(tmp_path):
    tensors = numpy_tensors()
    tensors["bf16"] = (np.arange(-6, 6, dtype=np.float32) / 3).reshape(3, 4).astype(ml_dtypes.bfloat16)
    tensors["bf16_scalar"] = np.array(2.5, ml_dtypes.bfloat16)
    tensors["f8_e4m3"] = np.linspace(-2, 2, 5).astype(ml_dtypes.float8_e4m3fn)
    tensors["jax_f32"] = jnp.arange(12, dtype=jnp.float32).reshape(4, 3)  # a device array, pulled via fetch
    path = tmp_path / "ours.safetensors"
    fetched = []

    def fetch(arr):
        fetched.append(1)
        return np.asarray(arr)

    stf.write_file(path, list(tensors.items()), fetch, {"format": "pt", "k": "v"})
    assert len(fetched) == len(tensors)
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"format": "pt", "k": "v"}
    by_torch = safetensors.torch.load_file(path)
    assert {n: torch_raw(t) for n, t in by_torch.items()} == {
        n: (np.asarray(a).dtype.name, tuple(np.shape(a)), np.asarray(a).tobytes()) for n, a in tensors.items()}
    assert torch.equal(by_torch["bf16"], torch.arange(-6, 6).reshape(3, 4).div(3).to(torch.bfloat16))
    np_only = {n: a for n, a in tensors.items() if n in numpy_tensors()}
    path2 = tmp_path / "ours_np.safetensors"
    stf.write_file(path2, list(np_only.items()), np.asarray, {})
    by_numpy = safetensors.numpy.load_file(path2)
    assert set(by_numpy) == set(np_only)
    for name, expected in np_only.items():
        assert by_numpy[name].dtype == expected.dtype and by_numpy[name].shape == expected.shape, name
        np.testing.assert_array_equal(by_numpy[name], expected)


def test_write_refuses_unstorable_dtype(tmp_path):
    with pytest.raises(TypeError, match="c64"):
        stf.write_file(tmp_path / "x.safetensors", [("c64", np.zeros(2, np.complex64))], np.asarray, {})
    assert not (tmp_path / "x.safetensors").exists()


# --------------------------------------------------------------------------------------------------------------
# 4. `.bin` checkpoints


def bin_folder(src: Path, dst: Path, state: dict[str, torch.Tensor], shards: int = 1) -> Path:
    """An HF folder with src's config and `state` saved by torch (optionally sharded with an index)."""
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    if shards == 1:
        torch.save(state, dst / "pytorch_model.bin")
        return dst
    names = list(state)
    weight_map = {}
    for i in range(shards):
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {n: state[n] for n in names[i::shards]}
        torch.save(part, dst / file)
        weight_map.update({n: file for n in part})
    (dst / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


@pytest.mark.parametrize("variant", ["llama-f32", "llama-bf16", "qwen2-bf16"])
@pytest.mark.parametrize("shards", [1, 3])
def test_bin_checkpoint_loads_like_safetensors(models, tmp_path, variant, shards):
    folder, torch_model = models[variant]
    state = torch_model.state_dict()
    dst = bin_folder(folder, tmp_path / "bin", state, shards)
    model = enchtable_jax.load(dst)
    assert params_raw(model.params) == raw_tensors(folder)
    assert params_raw(model.params) == {n: torch_raw(t) for n, t in state.items()}
    assert enchtable_jax.describe(dst)["format"] == "hf (bin)"


def test_tied_bin_checkpoint_with_shared_head(models, tmp_path):
    """A tied model's torch state_dict also lists lm_head.weight (shared storage): accepted, no warning."""
    folder, torch_model = models["llama-tied"]
    state = torch_model.state_dict()
    assert "lm_head.weight" in state
    dst = bin_folder(folder, tmp_path / "bin", state)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model = enchtable_jax.load(dst)
    assert params_raw(model.params) == {n: torch_raw(t) for n, t in state.items()}


def test_bin_without_torch_names_the_extra(models, tmp_path, monkeypatch):
    folder, torch_model = models["llama-f32"]
    dst = bin_folder(folder, tmp_path / "bin", torch_model.state_dict())
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails as on the plain install
    with pytest.raises(ImportError, match=r"pytorch_model\.bin: .*pip install 'enchtable-jax\[torch\]'"):
        enchtable_jax.load(dst)


def test_legacy_format_bin_loads(models, tmp_path):
    folder, torch_model = models["llama-bf16"]
    dst = tmp_path / "legacy"
    dst.mkdir()
    shutil.copy(folder / "config.json", dst)
    torch.save(torch_model.state_dict(), dst / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    assert params_raw(enchtable_jax.load(dst).params) == raw_tensors(folder)


class OpenFile:
    """Unpickling this would call open(path, 'w'): creates the marker file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


class ShellTouch:
    """Unpickling this would run `touch path` through os.system."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def write_payload(file: Path, obj, how: str) -> None:
    if how == "pickle":
        with open(file, "wb") as f:
            pickle.dump(obj, f)
    else:
        torch.save(obj, file, _use_new_zipfile_serialization=how == "torch")


@pytest.mark.parametrize("payload", [OpenFile, ShellTouch])
@pytest.mark.parametrize("how", ["torch", "torch-legacy", "pickle"])
def test_payloads_are_live(tmp_path, payload, how):
    """The oracle for the refusal test: an unrestricted unpickler does run these payloads."""
    marker = tmp_path / "pwned"
    write_payload(tmp_path / "x.bin", {"w": torch.ones(2), "evil": payload(marker)}, how)
    if how == "pickle":
        with open(tmp_path / "x.bin", "rb") as f:
            pickle.load(f)
    else:
        torch.load(tmp_path / "x.bin", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("payload", [OpenFile, ShellTouch])
@pytest.mark.parametrize("how", ["torch", "torch-legacy", "pickle"])
@pytest.mark.parametrize("inside_dict", [True, False])
def test_malicious_bin_is_refused_without_running(models, tmp_path, payload, how, inside_dict):
    folder, torch_model = models["llama-f32"]
    marker = tmp_path / "pwned"
    dst = tmp_path / "evil"
    dst.mkdir()
    shutil.copy(folder / "config.json", dst)
    obj = {**torch_model.state_dict(), "model.norm.weight": payload(marker)} if inside_dict else payload(marker)
    file = dst / "pytorch_model.bin"
    write_payload(file, obj, how)
    assert not marker.exists()
    with pytest.raises(ValueError) as err:  # UnsafeCheckpointError is a ValueError
        enchtable_jax.load(dst)
    assert str(file) in str(err.value)
    assert not marker.exists(), "unpickling ran the payload"
    if how == "torch":  # legacy-format files are refused by the mmap bug above before they are unpickled
        assert isinstance(err.value, UnsafeCheckpointError)
        assert "refused" in str(err.value)


def test_bin_with_non_tensor_values_is_refused(models, tmp_path):
    folder, _ = models["llama-f32"]
    dst = bin_folder(folder, tmp_path / "bin", {"model.norm.weight": [1.0, 2.0]})  # a list: allowed by torch
    with pytest.raises(UnsafeCheckpointError, match="pytorch_model.bin"):
        enchtable_jax.load(dst)


# --------------------------------------------------------------------------------------------------------------
# 5. Bad input: clear errors naming the file / tensor, nothing written


def assert_fails(folder: Path, parent: Path, exc, *needles: str) -> str:
    """load(folder) raises `exc` whose message holds every needle; nothing under `parent` changed."""
    before = snapshot(parent)
    with pytest.raises(exc) as err:
        enchtable_jax.load(folder)
    message = str(err.value)
    for needle in needles:
        assert needle in message, (needle, message)
    assert snapshot(parent) == before
    return message


def test_missing_config(f32, tmp_path):
    src, _ = f32
    (src / "config.json").unlink()
    assert_fails(src, tmp_path, FileNotFoundError, str(src), "config.json")


def test_missing_folder(tmp_path):
    assert_fails(tmp_path / "nope", tmp_path, FileNotFoundError, str(tmp_path / "nope"))


def test_missing_weights(f32, tmp_path):
    src, _ = f32
    (src / "model.safetensors").unlink()
    assert_fails(src, tmp_path, FileNotFoundError, str(src), "model.safetensors", "no weights")
    with pytest.raises(FileNotFoundError, match="no weights"):
        enchtable_jax.describe(src)


def test_missing_tensor(f32, tmp_path):
    src, _ = f32
    rewrite_weights(src, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    assert_fails(src, tmp_path, ValueError, str(src), "model.layers.1.mlp.up_proj.weight", "missing")


def test_wrong_shape(f32, tmp_path):
    src, _ = f32
    name = "model.layers.2.self_attn.k_proj.weight"  # (kv_heads * head_dim, hidden) = (32, 64)

    def edit(t):
        t[name] = torch.zeros(32, 63)

    rewrite_weights(src, edit)
    assert_fails(src, tmp_path, ValueError, str(src), name, "(32, 63)", "(32, 64)")


def test_extra_tensors_warn_are_kept_and_written_back(f32, tmp_path):
    src, _ = f32
    extras = {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.arange(8, dtype=torch.float32),
              "extra.scale": torch.tensor([3, 1, 4], dtype=torch.int32)}
    rewrite_weights(src, lambda t: t.update(extras))
    with pytest.warns(UserWarning) as record:
        model = enchtable_jax.load(src)
    message = " ".join(str(w.message) for w in record)
    for name in extras:
        assert name in message
        assert jax_raw(model.params[name]) == torch_raw(extras[name])
    assert sorted(enchtable_jax.describe(src)["extra_tensors"]) == sorted(extras)
    out = enchtable_jax.save(model, tmp_path / "out")
    assert raw_tensors(out) == raw_tensors(src)


def test_extra_64bit_tensors_are_kept(f32, tmp_path):
    src, _ = f32
    extras = {"extra.ids": torch.tensor([2**40, -3], dtype=torch.int64),
              "extra.f64": torch.tensor([0.1], dtype=torch.float64)}
    rewrite_weights(src, lambda t: t.update(extras))
    with pytest.warns(UserWarning, match="extra.ids"):
        model = enchtable_jax.load(src)
    out = enchtable_jax.save(model, tmp_path / "out")
    assert raw_tensors(out) == raw_tensors(src)


def test_truncated_safetensors(f32, tmp_path):
    src, _ = f32
    file = src / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    message = assert_fails(src, tmp_path, SafetensorsError, str(file), "truncated")
    assert "tensor " in message  # names the first tensor that does not fit
    with pytest.raises(SafetensorsError, match="model.safetensors"):
        enchtable_jax.describe(src)


@pytest.mark.parametrize("corruption", ["garbage", "garbage-json", "tiny", "length-too-big", "bad-entry"])
def test_corrupt_safetensors_header(f32, tmp_path, corruption):
    src, _ = f32
    file = src / "model.safetensors"
    data = file.read_bytes()
    if corruption == "garbage":
        file.write_bytes(np.random.default_rng(0).integers(0, 256, len(data), dtype=np.uint8).tobytes())
    elif corruption == "garbage-json":
        n = int.from_bytes(data[:8], "little")
        file.write_bytes(data[:8] + b"\xff{garbage" + data[18:8 + n] + data[8 + n:])
    elif corruption == "tiny":
        file.write_bytes(data[:4])
    elif corruption == "length-too-big":
        file.write_bytes((len(data) + 1).to_bytes(8, "little") + data[8:])
    else:
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + n])
        header["model.norm.weight"]["dtype"] = "F99"
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (n - len(raw))
        assert len(raw) == n
        file.write_bytes(data[:8] + raw + data[8 + n:])
    assert_fails(src, tmp_path, SafetensorsError, str(file), "not a valid safetensors file")


def test_index_lists_missing_shard(models, tmp_path):
    folder, _ = models["llama-f32"]
    out = enchtable_jax.save(enchtable_jax.load(folder), tmp_path / "sharded", shard_size="100KB")
    missing = sorted(out.glob("model-*.safetensors"))[1]
    missing.unlink()
    assert_fails(out, tmp_path, FileNotFoundError, missing.name, "model.safetensors.index.json")


def test_index_disagrees_with_shards(models, tmp_path):
    folder, _ = models["llama-f32"]
    out = enchtable_jax.save(enchtable_jax.load(folder), tmp_path / "sharded", shard_size="100KB")
    index_file = out / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    name = "model.norm.weight"
    wrong = next(f for f in sorted(set(index["weight_map"].values())) if f != index["weight_map"][name])
    index["weight_map"][name] = wrong
    index_file.write_text(json.dumps(index))
    assert_fails(out, tmp_path, ValueError, name, wrong)


def test_save_refuses_incomplete_params(f32, tmp_path):
    src, _ = f32
    model = enchtable_jax.load(src)
    params = dict(model.params)
    del params["model.layers.0.self_attn.o_proj.weight"]
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match="model.layers.0.self_attn.o_proj.weight"):
        enchtable_jax.save(enchtable_jax.Model(model.config, params, model.source), tmp_path / "out")
    assert snapshot(tmp_path) == before


def test_output_exists(f32, tmp_path):
    src, _ = f32
    model = enchtable_jax.load(src)
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    before = snapshot(tmp_path)
    for write in (enchtable_jax.save, enchtable_jax.save_orbax):
        with pytest.raises(OutputExistsError, match="overwrite") as err:
            write(model, dst)
        assert str(dst) in str(err.value)
        assert snapshot(tmp_path) == before
    file = tmp_path / "a-file"
    file.write_text("x")
    with pytest.raises(enchtable_jax.errors.EnchtableError, match="is a file"):
        enchtable_jax.save(model, file, overwrite=True)
    assert file.read_text() == "x"

    out = enchtable_jax.save(model, dst, overwrite=True)
    assert out == dst.resolve()
    assert not (dst / "keep.txt").exists()
    assert raw_tensors(dst) == raw_tensors(src)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "out", "src"]  # no temporaries left


def failing_on_second_call(monkeypatch):
    """The second safetensors file opened for writing fails after a few bytes, as on a full disk."""
    real = stf.FileWriter
    calls = []

    def open_writer(path, *args, **kwargs):
        calls.append(Path(path).name)
        if len(calls) == 2:
            Path(path).write_bytes(b"partial")
            raise OSError("disk full (simulated)")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(stf, "FileWriter", open_writer)
    return calls


def test_interrupted_write_leaves_nothing(f32, tmp_path, monkeypatch):
    src, _ = f32
    model = enchtable_jax.load(src)
    before = snapshot(tmp_path)
    calls = failing_on_second_call(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        enchtable_jax.save(model, tmp_path / "out", shard_size="100KB")
    assert calls[-1].startswith("model-00002-of-")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out*")), "temporary folder left behind"
    assert snapshot(tmp_path) == before


def test_interrupted_overwrite_keeps_destination(f32, tmp_path, monkeypatch):
    src, _ = f32
    model = enchtable_jax.load(src)
    dst = enchtable_jax.save(model, tmp_path / "out", shard_size="150KB")
    before = snapshot(tmp_path)
    failing_on_second_call(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        enchtable_jax.save(model, dst, shard_size="100KB", overwrite=True)
    assert snapshot(tmp_path) == before  # old folder intact, no .out.tmp-* / .out.old-* left
    assert raw_tensors(dst) == raw_tensors(src)


# --------------------------------------------------------------------------------------------------------------
# 6. Orbax checkpoints


@pytest.fixture(scope="module")
def orbax_ckpt(models, tmp_path_factory):
    """(hf folder with tokenizer files, orbax checkpoint written from it, torch model); bfloat16 qwen2."""
    root = tmp_path_factory.mktemp("orbax")
    folder, torch_model = models["qwen2-bf16"]
    src = copy_model(folder, root / "src")
    add_tokenizer_files(src)
    ckpt = enchtable_jax.save_orbax(enchtable_jax.load(src), root / "ckpt")
    return src, ckpt, torch_model


def test_orbax_round_trip_exact(orbax_ckpt):
    src, ckpt, _ = orbax_ckpt
    assert ckpt.is_absolute() and enchtable_jax.is_orbax_checkpoint(ckpt)
    assert not enchtable_jax.is_orbax_checkpoint(src)
    for name, text in TOKENIZER_FILES.items():
        assert (ckpt / name).read_text() == text
    hf = enchtable_jax.load(src)
    restored = enchtable_jax.load(ckpt)
    assert restored.config == hf.config
    assert list(restored.params) == list(hf.params)
    assert params_raw(restored.params) == raw_tensors(src)
    assert all(a.dtype == jnp.bfloat16 for a in restored.params.values())
    assert all(a.sharding.device_set == {jax.devices()[0]} for a in restored.params.values())


def test_orbax_keeps_tensor_order(models, tmp_path):
    folder, _ = models["llama-tied"]
    model = enchtable_jax.load(folder)
    order = list(reversed(model.params))
    shuffled = enchtable_jax.Model(model.config, {n: model.params[n] for n in order}, model.source)
    restored = enchtable_jax.load(enchtable_jax.save_orbax(shuffled, tmp_path / "ckpt"))
    assert list(restored.params) == order
    assert params_raw(restored.params) == raw_tensors(folder)


def test_orbax_load_with_dtype(orbax_ckpt):
    src, ckpt, torch_model = orbax_ckpt
    restored = enchtable_jax.load(ckpt, dtype=jnp.float32)
    expected = {n: torch_raw(t.float()) for n, t in torch_model.state_dict().items()}
    assert params_raw(restored.params) == expected


def mesh_sharding():
    mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))

    def sharding(name, shape):
        if len(shape) == 2 and shape[0] % 8 == 0:
            return NamedSharding(mesh, P("x", None))
        return NamedSharding(mesh, P())

    return mesh, sharding


@pytest.mark.parametrize("source", ["orbax", "hf"])
def test_load_sharded_onto_mesh(orbax_ckpt, source):
    src, ckpt, _ = orbax_ckpt
    assert len(jax.devices()) == 8
    mesh, sharding = mesh_sharding()
    model = enchtable_jax.load(ckpt if source == "orbax" else src, sharding=sharding)
    assert params_raw(model.params) == raw_tensors(src)
    split = 0
    for name, arr in model.params.items():
        want = sharding(name, arr.shape)
        assert arr.sharding.is_equivalent_to(want, arr.ndim), (name, arr.sharding)
        assert arr.sharding.device_set == set(mesh.devices.flat)
        if want.spec == P("x", None):
            split += 1
            assert {s.data.shape for s in arr.addressable_shards} == {(arr.shape[0] // 8, arr.shape[1])}
            assert {s.index[0].start for s in arr.addressable_shards} == set(range(0, arr.shape[0], arr.shape[0] // 8))
        else:
            assert all(s.data.shape == arr.shape for s in arr.addressable_shards)
    assert 0 < split < len(model.params)  # both kinds present (vocab 101 is not divisible by 8)


def test_load_with_one_sharding_for_all(orbax_ckpt):
    src, ckpt, _ = orbax_ckpt
    mesh, _ = mesh_sharding()
    replicated = NamedSharding(mesh, P())
    for path in (ckpt, src):
        model = enchtable_jax.load(path, sharding=replicated)
        assert all(a.sharding.is_equivalent_to(replicated, a.ndim) for a in model.params.values())
        assert params_raw(model.params) == raw_tensors(src)


def test_orbax_to_hf(orbax_ckpt, tmp_path):
    src, ckpt, torch_model = orbax_ckpt
    model = enchtable_jax.load(ckpt)
    out = enchtable_jax.save(model, tmp_path / "hf")
    assert raw_tensors(out) == raw_tensors(src)
    for name in [*TOKENIZER_FILES, "generation_config.json"]:
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    assert not (out / "enchtable.json").exists() and not (out / "params").exists()
    assert json.loads((out / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    assert torch.equal(torch_logits(from_pretrained(out)), torch_logits(from_pretrained(src)))


def test_orbax_checkpoint_with_wrong_config(orbax_ckpt, tmp_path):
    src, ckpt, _ = orbax_ckpt
    bad = copy_model(ckpt, tmp_path / "ckpt")
    config = json.loads((bad / "config.json").read_text())
    config["intermediate_size"] += 8
    (bad / "config.json").write_text(json.dumps(config))
    assert_fails(bad, tmp_path, ValueError, str(bad), "mlp.gate_proj.weight", "config.json")


# --------------------------------------------------------------------------------------------------------------
# 7. describe


@pytest.mark.parametrize("variant", ["llama-f32", "llama-tied", "qwen2-bf16"])
def test_describe_hf(models, variant):
    folder, torch_model = models[variant]
    info = enchtable_jax.describe(folder)
    n = torch_model.num_parameters()
    tensors = raw_tensors(folder)
    assert info["parameters"] == n
    assert info["tied_head"] is torch_model.config.tie_word_embeddings
    assert info["dtypes"] == {str(torch_model.dtype).removeprefix("torch."): n}
    assert info["tensors"] == len(tensors)
    assert info["format"] == "hf (safetensors)"
    assert info["model_type"] == torch_model.config.model_type
    assert info["vocab_size"] == 101 and info["layers"] == 3 and info["kv_heads"] == 2 and info["head_dim"] == 16
    assert info["files"] == [{"file": "model.safetensors", "bytes": (folder / "model.safetensors").stat().st_size}]
    assert info["extra_tensors"] == []
    json.dumps(info)  # serialisable, as `enchtable info --json` prints it


def test_describe_sharded_and_orbax(models, orbax_ckpt, tmp_path):
    folder, torch_model = models["llama-f32"]
    out = enchtable_jax.save(enchtable_jax.load(folder), tmp_path / "sharded", shard_size="100KB")
    info = enchtable_jax.describe(out)
    assert info["parameters"] == torch_model.num_parameters()
    assert info["files"] == [{"file": p.name, "bytes": p.stat().st_size} for p in sorted(out.glob("*.safetensors"))]

    src, ckpt, qwen = orbax_ckpt
    info = enchtable_jax.describe(ckpt)
    n = qwen.num_parameters()
    assert info["format"] == "orbax"
    assert info["parameters"] == n
    assert info["tied_head"] is False
    assert info["dtypes"] == {"bfloat16": n}
    assert info["tensors"] == len(raw_tensors(src))
    assert info["files"][0]["bytes"] > 0
    assert info["architecture"] == "Qwen2ForCausalLM"


def test_large_tensors_start_their_writeback_at_their_own_bytes(tmp_path, monkeypatch):
    """A tensor of ≥ 1 MiB asks the kernel to start writing exactly its byte range (sync_file_range on Linux), and
    the file still reads back through the safetensors package."""
    big = np.arange(stf._WRITEBACK_BYTES // 4 + 3, dtype=np.float32)
    tensors = [("a", np.ones(3, np.float32)), ("big", big), ("z", np.full(5, 2.0, np.float32))]
    ranges = []
    real = stf.start_writeback
    monkeypatch.setattr(stf, "start_writeback", lambda fd, offset, n: (ranges.append((offset, n)), real(fd, offset, n)))
    path = tmp_path / "big.safetensors"
    stf.write_file(path, tensors, np.asarray, {})
    header_length = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    with safe_open(path, "np") as f:
        begin, end = json.loads(path.read_bytes()[8:header_length])["big"]["data_offsets"]
        assert np.array_equal(f.get_tensor("big"), big) and np.array_equal(f.get_tensor("z"), tensors[2][1])
    assert ranges == [(header_length + begin, end - begin)]
    assert stf._sync_file_range() is not None or not sys.platform.startswith("linux")


def test_sinks_write_tensors_piece_by_piece_from_threads(tmp_path):
    """`HFWriter.sink`: a tensor written in pieces, out of order and from several threads at once, beside one added
    whole, reads back through the safetensors package; a sink left open keeps its file unfinished, so the folder is
    refused and nothing is published."""
    import concurrent.futures

    config = preset_config("tiny", num_hidden_layers=1)
    params = {n: np.asarray(v) for n, v in init_params(config, seed=0).items()}
    pieces = {n: [(i, v.reshape(-1)[i:i + 7]) for i in range(0, v.size, 7)][::-1] for n, v in params.items()}
    first, late, *rest = params
    with HFWriter(tmp_path / "out", config, params, progress=False) as writer:
        late_sink = writer.sink(late)  # finished last: its file must wait for it

        def fill(name, sink=None):
            sink = sink or writer.sink(name)
            for start, piece in pieces[name]:
                sink.write(start, piece)
            sink.close()

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            list(pool.map(fill, rest))
        writer.add(first, params[first])
        with pytest.raises(enchtable_jax.errors.EnchtableError, match=f"tensor {first} was already written"):
            writer.sink(first)
        fill(late, late_sink)
    got = safetensors.numpy.load_file(tmp_path / "out" / "model.safetensors")
    assert set(got) == set(params) and all(np.array_equal(got[n], v) for n, v in params.items())

    with pytest.raises(enchtable_jax.errors.EnchtableError, match="1 declared tensor\\(s\\) were never added"):
        with HFWriter(tmp_path / "open", config, params, progress=False) as writer:
            for name in params:
                sink = writer.sink(name)
                sink.write(0, params[name].reshape(-1))
                if name != first:
                    sink.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
