"""Hugging Face model folders ⇄ flat parameter dicts.

Reading streams one tensor at a time from single or sharded safetensors (or, through the safe loader,
`.bin`), keeps the stored dtype and checks every name and shape against the config before any tensor
data is read. Writing produces what `transformers.AutoModelForCausalLM.from_pretrained` expects:
config.json, generation_config.json, tokenizer and chat-template files copied from a reference folder,
sharded safetensors with an index, metadata `format: pt`, all written atomically by `HFWriter`, one tensor at a
time as a producer computes it (`write_hf` for a complete dict).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from huggingface_hub import StateDictSplit, split_state_dict_into_shards_factory
from tqdm.auto import tqdm

from enchtable_jax.converters import safetensors_format as stf
from enchtable_jax.converters.atomic import check_destination, publish, staging_folder
from enchtable_jax.safe_io import MissingFileError, check_inside, contained, read_json
from enchtable_jax.errors import EnchtableError
from enchtable_jax.converters.torch_bin import load_bin
from enchtable_jax.models.config import ModelConfig
from enchtable_jax.models.tensors import check_shapes
from enchtable_jax.nonfinite import check_input, check_output

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
DEFAULT_SHARD_SIZE = "5GB"
# Files of a model folder that are not copied from a reference folder: weights, indices, the config
# (written from the model's own), and this package's checkpoint marker.
# Not companions: weights, configs, and the records this project writes about how a folder was made (a merge or a
# fine-tune of a folder is another model, whose records would otherwise be the source's, silently wrong).
_NOT_COPIED = re.compile(r"(config\.json|enchtable\.json|.*\.(safetensors|bin|pt|pth|ckpt|gguf|msgpack|h5)"
                         r"|.*\.index\.json|(finetune|loss|merge_report|calibration)\.(json|png))$")

Sharding = jax.sharding.Sharding | Callable[[str, tuple[int, ...]], jax.sharding.Sharding] | None


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """Shape, dtype and file of one stored tensor."""

    shape: tuple[int, ...]
    dtype: np.dtype
    file: Path


@dataclasses.dataclass(frozen=True)
class WeightIndex:
    """Every tensor of a model folder and where it is stored, read from headers and index files only."""

    folder: Path
    format: str  # "safetensors" or "bin"
    files: tuple[Path, ...]
    tensors: Mapping[str, TensorSpec]
    infos: Mapping[str, stf.TensorInfo] = dataclasses.field(repr=False, default_factory=dict)  # safetensors byte ranges


def index_weights(folder: str | Path) -> WeightIndex:
    """Locate the weight files of an HF folder and list their tensors (no tensor data read for safetensors).

    Every weight file read resolves inside the folder (an index's shard names included, after symlinks).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such model folder")
    for fmt, single, index_name in (("safetensors", "model.safetensors", SAFETENSORS_INDEX),
                                    ("bin", "pytorch_model.bin", BIN_INDEX)):
        if (folder / index_name).is_file():
            files, expected = _files_from_index(folder, index_name)
            break
        if (folder / single).is_file():
            check_inside(folder, folder / single)
            files, expected = [folder / single], None
            break
    else:
        raise FileNotFoundError(f"{folder}: no weights found; expected model.safetensors, {SAFETENSORS_INDEX} with "
                                f"its shards, pytorch_model.bin or {BIN_INDEX}")
    tensors: dict[str, TensorSpec] = {}
    infos: dict[str, stf.TensorInfo] = {}
    for file in files:
        if fmt == "safetensors":
            file_infos, _ = stf.read_header(file)
            for name, info in file_infos.items():
                infos[name] = info
                tensors[name] = TensorSpec(info.shape, info.dtype, file)
        else:
            for name, arr in load_bin(file).items():
                tensors[name] = TensorSpec(arr.shape, arr.dtype, file)
    if expected is not None:
        for name, file in expected.items():
            if name not in tensors or tensors[name].file != file:
                raise EnchtableError(f"{folder / index_name}: tensor {name} is listed in {file.name} but that shard "
                                     "does not hold it; the index and the shards do not belong together")
    return WeightIndex(folder, fmt, tuple(files), tensors, infos)


def _files_from_index(folder: Path, index_name: str) -> tuple[list[Path], dict[str, Path]]:
    path = folder / index_name
    check_inside(folder, path)
    index = read_json(path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise EnchtableError(f"{path}: field weight_map must be a non-empty object of tensor name -> shard file, "
                             f"got {weight_map!r:.200}")
    suffix = ".safetensors" if index_name == SAFETENSORS_INDEX else ".bin"
    expected = {}
    for name, file in weight_map.items():
        resolved = contained(folder, file, path, f"weight_map[{name!r}]")
        if not file.endswith(suffix):
            raise EnchtableError(f"{path}: field weight_map[{name!r}] names {file!r}, not a {suffix} file")
        expected[name] = resolved  # the path that was checked is the path opened (normpath would differ by symlinks)
    files = list(dict.fromkeys(expected.values()))
    for file in files:
        if not file.is_file():
            raise MissingFileError(f"{path}: shard {file.name} is listed but missing from {folder}")
    return files, expected


def iter_tensors(index: WeightIndex, names: list[str] | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (name, array) one tensor at a time, file by file, in stored dtype."""
    wanted = set(index.tensors if names is None else names)
    for file in index.files:
        if index.format == "bin":
            for name, arr in load_bin(file).items():
                if name in wanted:
                    yield name, arr
            continue
        with open(file, "rb") as f:
            for name, spec in index.tensors.items():
                if spec.file == file and name in wanted:
                    yield name, stf.read_tensor(f, index.infos[name])


def placer(dtype=None, sharding: Sharding = None) -> Callable[[str, np.ndarray], jax.Array]:
    """A function that casts (floating tensors only) and places one host array on devices."""

    def place(name: str, arr: np.ndarray) -> jax.Array | np.ndarray:
        if dtype is not None and is_float(arr.dtype):
            arr = arr.astype(dtype)
        if arr.dtype.itemsize == 8 and not jax.config.jax_enable_x64:
            return arr  # 64-bit extras (e.g. int64 buffers) stay exact on the host instead of narrowing to 32 bits
        target = sharding(name, arr.shape) if callable(sharding) else sharding
        return jax.device_put(arr, target)

    return place


def is_float(dtype) -> bool:
    """Floating dtype, bfloat16 and float8 included (numpy alone does not know those)."""
    return bool(jnp.issubdtype(dtype, jnp.floating))


def read_hf(folder: str | Path, dtype=None, sharding: Sharding = None, progress: bool | None = None,
            allow_nonfinite: bool = False) -> tuple[ModelConfig, dict[str, jax.Array]]:
    """Load an HF folder: config, then every tensor checked, streamed, cast if `dtype`, and placed.

    A tensor holding NaN or Inf is refused, naming its file, unless `allow_nonfinite`.
    """
    folder = Path(folder)
    config = ModelConfig.from_file(folder / "config.json")
    index = index_weights(folder)
    extras = check_shapes(config, {n: s.shape for n, s in index.tensors.items()}, str(folder))
    if extras:
        warnings.warn(f"{folder}: {len(extras)} tensor(s) unknown to the {config.model_type} layout are kept as they "
                      f"are and written back: {', '.join(extras[:8])}{' ...' if len(extras) > 8 else ''}",
                      stacklevel=2)
    place = placer(dtype, sharding)
    loaded = {}
    bar = tqdm(total=sum(s.dtype.itemsize * int(np.prod(s.shape)) for s in index.tensors.values()), unit="B",
               unit_scale=True, desc=f"load {folder.name}", disable=_disable(progress))
    with bar:
        for name, arr in iter_tensors(index):
            check_input(arr, index.tensors[name].file, name, allow_nonfinite)  # the host buffer, before placing
            loaded[name] = place(name, arr)
            bar.update(arr.nbytes)
    params = {name: loaded[name] for name in index.tensors}  # stored order, not file order
    return config, params


def _disable(progress: bool | None) -> bool | None:
    return None if progress is None else not progress  # None: tqdm shows bars only on a terminal


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as '5GB', '500MB', '2GiB'."""
    if isinstance(size, int):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:([KMGT])(i)?)?B?\s*", str(size), re.IGNORECASE)
        if not m:
            raise EnchtableError(f"shard size {size!r} not understood; use bytes or e.g. '5GB', '500MB', '2GiB'")
        prefix = (m.group(2) or "").upper()
        base = 1024 if m.group(3) else 1000
        scale = base ** " KMGT".index(prefix) if prefix else 1
        value = int(float(m.group(1)) * scale)
    if value <= 0:
        raise EnchtableError(f"shard size must be positive, got {size!r}")
    return value


def plan_shards(params: Mapping[str, jax.Array], shard_size: int) -> StateDictSplit:
    """Files and their tensors as transformers' `save_pretrained` splits them (huggingface_hub's planner): names in
    order fill a shard up to `shard_size` bytes; a larger tensor gets a shard of its own."""
    return split_state_dict_into_shards_factory(
        dict(params), get_storage_size=lambda arr: int(np.prod(arr.shape)) * np.dtype(arr.dtype).itemsize,
        filename_pattern="model{suffix}.safetensors", max_shard_size=shard_size)


def copy_companion_files(src: Path | None, dst: Path) -> list[str]:
    """Copy tokenizer, chat template, generation config and similar top-level files from `src`."""
    if src is None:
        return []
    copied = []
    for file in sorted(Path(src).iterdir()):
        if file.is_file() and not file.name.startswith(".") and not _NOT_COPIED.fullmatch(file.name):
            shutil.copy2(check_inside(src, file), dst / file.name)
            copied.append(file.name)
    return copied


def hf_config_dict(config: ModelConfig, params: Mapping[str, jax.Array]) -> dict:
    """The config.json to write: the source's own, with the dtype field updated if the weights were cast."""
    raw = dict(config.hf)
    floats = {np.dtype(a.dtype).name for a in params.values() if is_float(a.dtype)}
    if len(floats) == 1:
        (name,) = floats
        for key in ("dtype", "torch_dtype"):
            if key in raw or key == "dtype":
                raw[key] = name
    return raw


class HFWriter:
    """An HF model folder written tensor by tensor, atomically: `add(name, array)` each declared tensor (in any order;
    in declaration order at most two shard files are open), `add_file` any extra file, then `close()`, which writes
    the config and the shard index and publishes the folder at `path` (`atomic.publish`). Until then everything is
    in a hidden staging sibling, removed by `abort()` or by an error inside a `with` block: the folder appears
    complete or not at all, and only the tensor being added is held here.

    `tensors` declares every tensor to come (anything with .shape and .dtype): their order is the order shards are
    planned in (huggingface_hub's planner, as `save_pretrained`) and the order of each file's header. Every tensor
    is checked to be finite when added (a NaN or Inf is an error naming it) unless `check_finite=False`, for a
    producer that checked it itself.
    """

    def __init__(self, path: str | Path, config: ModelConfig, tensors: Mapping[str, object],
                 like: str | Path | None = None, shard_size: int | str = DEFAULT_SHARD_SIZE, overwrite: bool = False,
                 progress: bool | None = None, check_finite: bool = True):
        self.path = check_destination(path, overwrite)
        limit = parse_size(shard_size)
        if like is not None and not Path(like).is_dir():
            raise FileNotFoundError(f"{like}: reference folder (like=) not found")
        check_shapes(config, {n: tuple(a.shape) for n, a in tensors.items()}, "params")
        self._specs = {n: (tuple(a.shape), np.dtype(a.dtype)) for n, a in tensors.items()}
        self._config_json = hf_config_dict(config, tensors)
        self._generation = {k: config.hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                            if config.hf.get(k) is not None}
        self._split = plan_shards(tensors, limit)
        self._overwrite, self._check_finite = overwrite, check_finite
        self._shards: dict[str, stf.FileWriter] = {}  # the files begun and not yet complete
        self._claimed: set[str] = set()  # by `add` or `sink`
        self._added: set[str] = set()  # and complete in its file
        self._lock = threading.Lock()  # sinks finish tensors on their writers' threads
        self._tmp: Path | None = staging_folder(self.path)
        self._bar = tqdm(total=self._split.metadata["total_size"], unit="B", unit_scale=True,
                         desc=f"write {self.path.name}", disable=_disable(progress))
        try:
            copy_companion_files(Path(like) if like is not None else None, self._tmp)
        except BaseException:
            self.abort()
            raise

    def __enter__(self) -> HFWriter:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if self._tmp is None:  # closed or aborted inside the block
            return
        if kind is None:
            self.close()
        else:
            self.abort()

    def add(self, name: str, array) -> None:
        """Write one declared tensor (a JAX or numpy array of its declared shape and dtype) into its shard."""
        self._claim(name, dry_run=True)
        host = np.asarray(jax.device_get(array))
        if (tuple(host.shape), host.dtype) != self._specs[name]:
            shape, dtype = self._specs[name]
            raise EnchtableError(f"{self.path}: tensor {name} is {host.dtype} {tuple(host.shape)}, declared as "
                                 f"{dtype} {shape}")
        if self._check_finite:
            check_output(host, str(self.path), name)
        self._claim(name)
        self._shard(name).add(name, host)
        self._finished(name)

    def sink(self, name: str) -> stf.TensorSink:
        """A `safetensors_format.TensorSink` that writes one declared tensor piece by piece from any thread, without
        the finite check (its producer checks the pieces); the tensor counts as added when the sink is closed."""
        self._claim(name)
        return self._shard(name).sink(name, then=lambda: self._finished(name))

    def _claim(self, name: str, dry_run: bool = False) -> None:
        """Take `name` for writing: declared, and not taken before (`dry_run`: only check that)."""
        self._staging()
        with self._lock:
            if name not in self._specs:
                raise EnchtableError(f"{self.path}: tensor {name} was not declared to the writer")
            if name in self._claimed:
                raise EnchtableError(f"{self.path}: tensor {name} was already written")
            if not dry_run:
                self._claimed.add(name)

    def _shard(self, name: str) -> stf.FileWriter:
        """The shard file that holds `name`, begun now if it was not."""
        file = self._split.tensor_to_filename[name]
        with self._lock:
            if file not in self._shards:
                self._shards[file] = stf.FileWriter(self._staging() / file,
                                                    [(n, jax.ShapeDtypeStruct(*self._specs[n]))
                                                     for n in self._split.filename_to_tensors[file]],
                                                    {"format": "pt"})
            return self._shards[file]

    def _finished(self, name: str) -> None:
        """`name` is in its file: closed (synced) once the file is complete."""
        file = self._split.tensor_to_filename[name]
        with self._lock:
            self._added.add(name)
            shard = self._shards[file]
            if shard.done:
                self._shards.pop(file).close()
            self._bar.update(math.prod(self._specs[name][0]) * self._specs[name][1].itemsize)

    def add_file(self, name: str, data: bytes | str) -> None:
        """Add a top-level file (a record, a plot) to the folder; text is written as UTF-8. The config, the index
        and the weight files are the writer's own."""
        staging = self._staging()
        if not name or Path(name).name != name or name.startswith(".") or name == "config.json" \
                or name.endswith((".safetensors", ".index.json")):
            raise EnchtableError(f"{self.path}: cannot add a file named {name!r} (a plain name, not the config, an "
                                 "index or a weight file)")
        (staging / name).write_bytes(data.encode() if isinstance(data, str) else data)

    def close(self) -> Path:
        """Check that every declared tensor was added, write config.json, generation_config.json (unless the
        reference folder or `add_file` gave one) and the index, and publish; returns the folder's absolute path.
        On any error nothing is published and the staging folder is removed."""
        staging = self._staging()
        try:
            missing = [n for n in self._specs if n not in self._added]
            if missing:
                raise EnchtableError(f"{self.path}: {len(missing)} declared tensor(s) were never added "
                                     f"({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}); nothing "
                                     "was published")
            self._write_metadata(staging)
            self._bar.close()
            publish(staging, self.path, self._overwrite)
        except BaseException:
            self.abort()
            raise
        self._tmp = None
        return self.path

    def abort(self) -> None:
        """Stop without publishing: close the open shards and delete the staging folder."""
        for shard in self._shards.values():
            shard.close()
        self._shards.clear()
        self._bar.close()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def _staging(self) -> Path:
        if self._tmp is None:
            raise EnchtableError(f"{self.path}: the writer is closed")
        return self._tmp

    def _write_metadata(self, folder: Path) -> None:
        (folder / "config.json").write_text(json.dumps(self._config_json, indent=2) + "\n")
        if not (folder / "generation_config.json").exists():
            generation = {**self._generation, "_from_model_config": True}
            (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))
        if self._split.is_sharded:
            index = {"metadata": self._split.metadata, "weight_map": self._split.tensor_to_filename}
            (folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def write_hf(path: str | Path, config: ModelConfig, params: Mapping[str, jax.Array], like: str | Path | None = None,
             shard_size: int | str = DEFAULT_SHARD_SIZE, overwrite: bool = False, progress: bool | None = None,
             extra_files: Mapping[str, bytes | str] | None = None, check_finite: bool = True) -> Path:
    """Write a complete parameter dict as an HF folder at `path` (atomically, through `HFWriter`), with
    `extra_files` (name -> bytes or text) beside the weights; returns its absolute path."""
    with HFWriter(path, config, params, like, shard_size, overwrite, progress, check_finite) as writer:
        for name, arr in params.items():
            writer.add(name, arr)
        for name, data in (extra_files or {}).items():
            writer.add_file(name, data)
    return writer.path
