"""Fuzzing the readers of untrusted folders (issue 15): mutated safetensors files, index files and configs make
them raise the package's error type and nothing else, they accept no safetensors file that the `safetensors`
package refuses, and they never open a file outside the folder they were given.

Opened files are observed with an audit hook (`sys.addaudithook`), which sees every `open` of the process,
whichever API makes it. Example counts are kept small so the file runs in seconds; raise `EXAMPLES` locally
when changing a reader.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
import transformers  # noqa: E402

from enchtable_jax.converters import safetensors_format as stf  # noqa: E402
from enchtable_jax.converters.hf import index_weights, iter_tensors  # noqa: E402
from enchtable_jax.errors import EnchtableError  # noqa: E402
from enchtable_jax.models.config import ConfigError, ModelConfig  # noqa: E402

EXAMPLES = 120
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# ----------------------------------------------------------------------------------- which files were opened

_recording: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if _recording is not None and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _recording.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)  # audit hooks cannot be removed; this one only records while `opened()` is active


@contextlib.contextmanager
def opened():
    """Collect the paths opened inside the block."""
    global _recording
    _recording = found = []
    try:
        yield found
    finally:
        _recording = None


def _assert_inside(paths: list[str], folder: Path) -> None:
    real = Path(os.path.realpath(folder))
    outside = [p for p in paths if not Path(os.path.realpath(p)).is_relative_to(real)]
    assert not outside, f"read outside {folder}: {outside}"


def test_the_audit_hook_sees_opens():
    with opened() as paths:
        Path(__file__).read_bytes()
    assert __file__ in paths


# ------------------------------------------------------------------------------------------- the folders used

@pytest.fixture(scope="module")
def area():
    """tmp/outside/sentinel.safetensors (a valid file the readers must never open) and tmp/model/."""
    root = Path(tempfile.mkdtemp(prefix="fuzz-readers-"))
    (root / "outside").mkdir()
    stf.write_file(root / "outside" / "sentinel.safetensors", [("model.a", np.ones(4, np.float32))], np.asarray,
                   {"format": "pt"})
    (root / "model").mkdir()
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _valid_file() -> bytes:
    path = Path(tempfile.mkdtemp()) / "v.safetensors"
    tensors = [("a", np.arange(6, dtype=np.float32).reshape(2, 3)), ("b", np.arange(4, dtype=np.int16)),
               ("c", np.zeros((0, 3), np.float16))]
    stf.write_file(path, tensors, np.asarray, {"format": "pt"})
    data = path.read_bytes()
    shutil.rmtree(path.parent)
    return data


VALID = _valid_file()


def _oracle_accepts(path: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            for name in f.keys():
                f.get_slice(name)
    except Exception:  # noqa: BLE001 - the oracle's error types vary between versions
        return False
    return True


def _read_all(path: Path) -> dict:
    infos, _ = stf.read_header(path)
    with open(path, "rb") as f:
        return {name: stf.read_tensor(f, info) for name, info in infos.items()}


def _check_file(path: Path, content: bytes) -> None:
    """Ours refuses only with SafetensorsError, and accepts nothing the safetensors package refuses."""
    path.write_bytes(content)
    try:
        with opened() as paths:
            _read_all(path)
    except stf.SafetensorsError as e:
        assert "\n" not in str(e)
        return
    _assert_inside(paths, path.parent)
    assert _oracle_accepts(path), f"accepted a file the safetensors package refuses: {content[:300]!r}"


# ---------------------------------------------------------------------------------------------- safetensors

mutation = st.tuples(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]),
                     st.integers(0, len(VALID) - 1), st.integers(0, 255))


@FUZZ
@given(st.lists(mutation, min_size=1, max_size=4))
def test_fuzz_safetensors_bytes(area, mutations):
    pytest.importorskip("safetensors")
    data = bytearray(VALID)
    for op, at, byte in mutations:
        at = min(at, max(len(data) - 1, 0))
        if op == "flip" and data:
            data[at] ^= 1 << (byte % 8)
        elif op == "set" and data:
            data[at] = byte
        elif op == "insert":
            data.insert(at, byte)
        elif op == "delete" and data:
            del data[at]
        elif op == "truncate":
            del data[at:]
    _check_file(area / "model" / "bytes.safetensors", bytes(data))


PERTURB = st.sampled_from(["negate", "bool", "float", "huge", "huge-zero", "string-dim", "dtype", "dtype-type",
                            "no-shape", "no-offsets", "offsets-3", "offsets-str", "entry-list", "extra-field",
                            "metadata-int", "metadata-list", "metadata-null", "surrogate-name", "duplicate",
                            "padding", "junk-after"])


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(sorted(stf.DTYPES)), st.lists(st.integers(0, 3), max_size=3)),
                min_size=1, max_size=4),
       st.lists(st.tuples(PERTURB, st.integers(0, 10)), max_size=3))
def test_fuzz_safetensors_headers(area, tensors, perturbations):
    """Consistent headers, then field-level damage: every type, range and overflow check is reached, alone or
    combined, and each damaged file is also given to the `safetensors` package."""
    pytest.importorskip("safetensors")
    entries, offset = [], 0
    for i, (dtype, shape) in enumerate(tensors):
        nbytes = int(np.prod(shape, dtype=np.int64)) * stf.DTYPES[dtype].itemsize
        entries.append([f"t{i}", {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}])
        offset += nbytes
    metadata: object = {"format": "pt"}
    padding, duplicate = b"", False
    for kind, k in perturbations:
        name, entry = entries[k % len(entries)]
        if not isinstance(entry, dict):  # an earlier "entry-list" replaced it: nothing left to damage
            continue
        shape = entry.get("shape")
        dim = k % len(shape) if isinstance(shape, list) and shape else None
        if kind == "negate" and dim is not None and isinstance(shape[dim], int):  # same product, negative dims
            shape[dim:dim + 1] = [-1, -shape[dim]]
        elif kind == "bool" and isinstance(shape, list):
            shape.append(True)
        elif kind == "float" and dim is not None:
            shape[dim] = float(shape[dim]) if isinstance(shape[dim], int) else 1.5
        elif kind == "huge" and isinstance(shape, list):
            shape.extend([2 ** 32, 2 ** 32])
        elif kind == "huge-zero" and isinstance(shape, list):  # the product is 0 in Python, an overflow in u64
            shape[:] = [2 ** 40, 2 ** 40, 0] if k % 2 else [0, 2 ** 64 + k]
        elif kind == "string-dim" and isinstance(shape, list):
            shape.append("2")
        elif kind == "dtype":
            entry["dtype"] = ["F33", "f32", "", "C64", "F8_E8M0"][k % 5]
        elif kind == "dtype-type":
            entry["dtype"] = [4, None, ["F32"]][k % 3]
        elif kind == "no-shape":
            entry.pop("shape", None)
        elif kind == "no-offsets":
            entry.pop("data_offsets", None)
        elif kind == "offsets-3" and isinstance(entry.get("data_offsets"), list):
            entry["data_offsets"].append(k)
        elif kind == "offsets-str":
            entry["data_offsets"] = "0,8"
        elif kind == "entry-list":
            entries[k % len(entries)][1] = [1, 2, 3]
        elif kind == "extra-field" and isinstance(entry, dict):
            entry["extra"] = k
        elif kind == "metadata-int":
            metadata = {"format": k}
        elif kind == "metadata-list":
            metadata = ["pt"]
        elif kind == "metadata-null":
            metadata = None
        elif kind == "surrogate-name":
            entries[k % len(entries)][0] = "t\ud800"
        elif kind == "duplicate":
            duplicate = True
        elif kind == "padding":
            padding += b" " * (k + 1)
        elif kind == "junk-after":
            padding += b"\x00"
    value = {"__metadata__": metadata, **dict(entries)}
    raw = json.dumps(value).encode()
    if duplicate:  # the first tensor a second time, with the same span
        raw = raw[:-1] + b"," + json.dumps({entries[0][0]: entries[0][1]}).encode()[1:]
    raw += padding
    _check_file(area / "model" / "header.safetensors", struct.pack("<Q", len(raw)) + raw + bytes(offset))


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(sorted(stf.DTYPES)), st.lists(st.integers(0, 3), max_size=2)),
                max_size=4),
       st.lists(st.integers(-8, 8), min_size=0, max_size=8), st.integers(-4, 4))
def test_fuzz_safetensors_offsets(area, tensors, shifts, tail):
    """Well-formed headers whose offsets are shifted: gaps, overlaps and short or long data regions."""
    pytest.importorskip("safetensors")
    value, offset = {}, 0
    for i, (dtype, shape) in enumerate(tensors):
        nbytes = int(np.prod(shape, dtype=np.int64)) * stf.DTYPES[dtype].itemsize
        begin = max(0, offset + (shifts[2 * i] if 2 * i < len(shifts) else 0))
        end = max(0, begin + nbytes + (shifts[2 * i + 1] if 2 * i + 1 < len(shifts) else 0))
        value[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}
        offset = end
    raw = json.dumps(value).encode()
    _check_file(area / "model" / "offsets.safetensors", struct.pack("<Q", len(raw)) + raw + bytes(max(0, offset + tail)))


# -------------------------------------------------------------------------------------------------- the index

SHARDS = {"s1.safetensors": [("model.a", np.ones(4, np.float32)), ("model.b", np.ones(2, np.int8))],
          "s2.safetensors": [("model.c", np.ones(3, np.float16))]}


def _sharded(folder: Path) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir()
    for file, tensors in SHARDS.items():
        stf.write_file(folder / file, tensors, np.asarray, {"format": "pt"})


def _shard_names(root: Path):
    sentinel = root / "outside" / "sentinel.safetensors"
    return st.one_of(st.sampled_from(["s1.safetensors", "s2.safetensors", "./s1.safetensors", "x/../s2.safetensors",
                                      "missing.safetensors", "../outside/sentinel.safetensors",
                                      "../../outside/sentinel.safetensors", str(sentinel), "/etc/passwd",
                                      "s1.safetensors\x00", "", ".", "..", "link.safetensors"]),
                     st.text(max_size=8), st.integers(), st.none(), st.lists(st.text(max_size=2), max_size=2))


@FUZZ
@given(st.data())
def test_fuzz_index(area, data):
    """Index files with mutated weight maps: only the package's error, and no file opened outside the folder."""
    folder = area / "model" / "sharded"
    _sharded(folder)
    if data.draw(st.booleans()):  # a symlink inside the folder that leaves it
        (folder / "link.safetensors").symlink_to(area / "outside" / "sentinel.safetensors")
    names = ["model.a", "model.b", "model.c", "model.z"]
    weight_map = data.draw(st.dictionaries(st.sampled_from(names), _shard_names(area), max_size=4))
    index = data.draw(st.one_of(st.just({"metadata": {}, "weight_map": weight_map}), st.just({"weight_map": 3}),
                                st.just([weight_map]), st.just({})))
    raw = json.dumps(index).encode()
    if data.draw(st.booleans()):  # and sometimes the bytes themselves are damaged
        at = data.draw(st.integers(0, len(raw)))
        raw = raw[:at] + data.draw(st.binary(max_size=3)) + raw[at + 1:]
    (folder / "model.safetensors.index.json").write_bytes(raw)
    try:
        with opened() as paths:
            index_ = index_weights(folder)
            for _ in iter_tensors(index_):
                pass
    except EnchtableError as e:
        assert "\n" not in str(e)
    _assert_inside(paths, folder)  # refused or not, nothing outside was opened


def test_the_index_fuzz_can_see_a_read_outside(area):
    """The observation above is not vacuous: reading the sentinel directly is caught."""
    with opened() as paths:
        stf.read_header(area / "outside" / "sentinel.safetensors")
    with pytest.raises(AssertionError, match="read outside"):
        _assert_inside(paths, area / "model")


# ------------------------------------------------------------------------------------------------- the config

VALID_CONFIG = {"model_type": "qwen2", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 32,
                "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "rms_norm_eps": 1e-6,
                "rope_theta": 10000.0, "tie_word_embeddings": False, "use_sliding_window": True,
                "sliding_window": 8, "max_window_layers": 1, "max_position_embeddings": 64, "head_dim": 8,
                "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
                "layer_types": ["full_attention", "sliding_attention"], "hidden_act": "silu"}

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2, 2 ** 70), st.floats(allow_nan=True, allow_infinity=True),
              st.text(max_size=5), st.sampled_from(["llama", "mistral", "silu", "linear", "sliding_attention"])),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)),
    max_leaves=6)


# the values a loose reader gets wrong: bools as ints, integral floats, non-finite floats, numeric strings
edge_values = st.sampled_from([True, False, 0, -1, 1.0, 2.5, float("nan"), float("inf"), -float("inf"), "1", "tiny",
                               None, [], {}, [1], 2 ** 70])


@FUZZ
@given(st.dictionaries(st.sampled_from(sorted(VALID_CONFIG) + ["attention_bias", "mlp_bias", "rope_parameters"]),
                       st.one_of(edge_values, json_values), min_size=1, max_size=3),
       st.sampled_from(["qwen2", "llama", "mistral"]))
def test_fuzz_config_fields(changes, model_type):
    raw = {**VALID_CONFIG, "model_type": model_type, **changes}
    try:
        config = ModelConfig.from_hf(raw, source="fuzz/config.json")
    except ConfigError as e:
        assert "fuzz/config.json" in str(e) and "\n" not in str(e)
        return
    # accepted: every resolved field is what the forward pass expects
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim"):
        value = getattr(config, name)
        assert type(value) is int and value > 0, (name, value)
    for name in ("rms_norm_eps", "rope_theta"):
        assert np.isfinite(getattr(config, name)) and getattr(config, name) > 0
    assert type(config.tie_word_embeddings) is bool
    assert len(config.sliding_windows) == config.num_hidden_layers
    assert all(w is None or (type(w) is int and w > 0) for w in config.sliding_windows)


# A config that omits a field reads its default from transformers' config class, importing transformers (thousands
# of files in site-packages) on first use; imported here, so that the read-containment check sees only the model's.
transformers.LlamaConfig, transformers.MistralConfig, transformers.Qwen2Config


@FUZZ
@given(st.binary(max_size=6), st.integers(0, 400))
def test_fuzz_config_bytes(area, junk, at):
    path = area / "model" / "config.json"
    raw = json.dumps(VALID_CONFIG).encode()
    at = min(at, len(raw))
    path.write_bytes(raw[:at] + junk + raw[at + len(junk):])
    try:
        with opened() as paths:
            ModelConfig.from_file(path)
    except EnchtableError as e:
        assert str(path) in str(e) and "\n" not in str(e)
        return
    _assert_inside(paths, path.parent)
