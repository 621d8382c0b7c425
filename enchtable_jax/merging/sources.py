"""Read-one-tensor-at-a-time views of the merge inputs: HF folders, orbax checkpoints, in-memory
models, and the safety delta (a safety-vector folder, or aligned − harmful)."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from enchtable_jax.converters import safetensors_format as stf
from enchtable_jax.converters.hf import index_weights, iter_tensors
from enchtable_jax.converters.model_io import load
from enchtable_jax.converters.orbax_io import is_orbax_checkpoint
from enchtable_jax.converters.safety_vector import TENSORS, read_manifest
from enchtable_jax.errors import EnchtableError
from enchtable_jax.models.config import ModelConfig
from enchtable_jax.models.model import Model
from enchtable_jax.nonfinite import host_finite
from enchtable_jax.safe_io import check_inside

_CHUNK = 1 << 16  # entries of τ_safe per step of `SafetyDelta.any_nonzero`: 256 KiB of float32, cache-sized


class TensorSource:
    """Names, shapes and dtypes of a model's tensors, and `read(name)` of one of them (host numpy)."""

    def __init__(self, what: str, config: ModelConfig | None, specs: dict[str, tuple[tuple[int, ...], np.dtype]],
                 reader, folder: Path | None, files: dict[str, Path] | None = None):
        self.what, self.config, self.specs, self._reader, self.folder = what, config, specs, reader, folder
        self._files = files or {}

    def where(self, name: str) -> str:
        """Where tensor `name` is stored, for messages: its file, else the folder, else what the source is."""
        found = self._files.get(name, self.folder)
        what = self.what if "vector" in self.what else f"{self.what} model"
        return f"{what} {found}" if found is not None else f"{what} (in memory)"

    def read(self, name: str) -> np.ndarray:
        return self._reader(name)

    def files(self) -> dict[str, Path]:
        """{tensor name: the file it is read from}; empty for a model in memory."""
        return dict(self._files)

    def __contains__(self, name: str) -> bool:
        return name in self.specs


def open_model(model: Model | str | Path, what: str) -> TensorSource:
    """A source over an HF folder (streamed from its files), an orbax checkpoint or a loaded `Model`."""
    if isinstance(model, Model):
        params = model.params
        specs = {n: (tuple(v.shape), np.dtype(v.dtype)) for n, v in params.items()}
        return TensorSource(what, model.config, specs, lambda n: np.asarray(jax.device_get(params[n])), model.source)
    path = Path(model).expanduser().resolve()
    if is_orbax_checkpoint(path):  # orbax restores whole trees: loaded once, then served from memory
        return open_model(load(path), what)
    config = ModelConfig.from_file(path / "config.json")
    return _folder_source(path, what, config)


def _folder_source(path: Path, what: str, config: ModelConfig | None) -> TensorSource:
    index = index_weights(path)
    if index.format == "bin":  # pickled files cannot be read tensor by tensor
        params = dict(iter_tensors(index))
        specs = {n: (a.shape, a.dtype) for n, a in params.items()}
        return TensorSource(what, config, specs, params.__getitem__, path,
                            {n: s.file for n, s in index.tensors.items()})
    handles: dict[Path, object] = {}

    def read(name: str) -> np.ndarray:
        spec = index.tensors[name]
        if spec.file not in handles:
            handles[spec.file] = open(spec.file, "rb")  # noqa: SIM115 - kept open for the whole merge
        return stf.map_tensor(handles[spec.file], index.infos[name])

    specs = {n: (s.shape, s.dtype) for n, s in index.tensors.items()}
    return TensorSource(what, config, specs, read, path, {n: s.file for n, s in index.tensors.items()})


class SafetyDelta:
    """τ_safe per tensor: from a safety-vector folder, or aligned − harmful (float32)."""

    def __init__(self, vector: str | Path | None = None, aligned=None, harmful=None):
        if (vector is None) == (aligned is None or harmful is None):
            raise EnchtableError("give either a safety vector, or both an aligned and a harmful model")
        self.manifest, self.folder = None, None  # the safety-vector folder, when τ_safe comes from one
        if vector is not None:
            folder = self.folder = Path(vector).expanduser().resolve()
            self.manifest = read_manifest(folder)
            self.source = _folder_source_from_file(folder / TENSORS, "safety vector")
            self.what = f"safety vector {folder}"
        else:
            self.aligned, self.harmful = open_model(aligned, "aligned"), open_model(harmful, "harmful")
            for name, (shape, _) in self.aligned.specs.items():
                if name in self.harmful and self.harmful.specs[name][0] != shape:
                    raise EnchtableError(f"tensor {name}: aligned shape {shape} differs from harmful "
                                         f"{self.harmful.specs[name][0]}; the harmful model must be the aligned one "
                                         "after fine-tuning")
            self.source = None
            self.what = "aligned − harmful"

    def check_tensors(self, base: TensorSource, task: TensorSource, merged: int) -> None:
        """Refuse a safety-vector file that would merge silently wrong or not at all, naming the file and tensor: a
        tensor the base model does not have, one of another shape, one that is not floating-point, no tensor of the
        model at all, or (`merged` == 0) zero on every tensor of the model."""
        if self.source is None:
            return
        file = self.source.where(next(iter(self.source.specs), "")).removeprefix("safety vector ")
        for name in sorted(self.source.specs):
            shape, dtype = self.source.specs[name]
            if name not in base.specs:
                raise EnchtableError(f"{file}: tensor {name} is not a tensor of the base model {base.folder} (a vector "
                                     "of another architecture, or an edited file?)")
            if not np.issubdtype(np.dtype(dtype), np.floating):
                raise EnchtableError(f"{file}: tensor {name} has dtype {np.dtype(dtype)}; a safety vector holds "
                                     "floating-point deltas")
            if tuple(shape) != tuple(base.specs[name][0]):
                raise EnchtableError(f"{file}: tensor {name} has shape {tuple(shape)}, the base model's "
                                     f"{tuple(base.specs[name][0])}; the vector was not made from this model")
        if not set(self.source.specs) & set(task.specs):
            raise EnchtableError(f"{file}: holds no tensor of the model ({len(self.source.specs)} tensor(s), none "
                                 "named like the task model's); nothing would be merged")
        if merged == 0:
            raise EnchtableError(f"{file}: the safety vector is zero on every tensor of the model; nothing would be "
                                 "merged (distil it again, with more steps or --warmup-ratio 0)")

    def names(self) -> set[str]:
        if self.source is not None:
            return set(self.source.specs)
        return set(self.aligned.specs) & set(self.harmful.specs)

    def shape(self, name: str) -> tuple[int, ...]:
        return (self.source or self.aligned).specs[name][0]

    def locate_nonfinite(self, name: str) -> tuple[str, np.ndarray] | None:
        """(where, array) of the stored tensor behind a non-finite τ_safe[name], or None (the slow path of a failed
        check: the file to name in the message)."""
        sources = [self.source] if self.source is not None else [self.aligned, self.harmful]
        for source in sources:
            arr = source.read(name)
            if not host_finite(arr):
                return source.where(name), arr
        return None

    def parts(self, name: str) -> list[np.ndarray]:
        """The stored tensors τ_safe[name] is made of, flat, in their dtypes: [τ_safe] from a vector, [aligned,
        harmful] from a pair (τ_safe = the float32 difference)."""
        parts = [self.source.read(name)] if self.source is not None else [self.aligned.read(name),
                                                                          self.harmful.read(name)]
        return [p.reshape(-1) for p in parts]

    def any_nonzero(self, name: str) -> bool:
        """Whether τ_safe[name] has an entry that is not zero (NaN counts, as for `np.any`), computed chunk by chunk
        up to the first such entry: a delta is rarely zero, so this reads a few pages rather than two tensors."""
        flat = self.parts(name)
        for start in range(0, flat[0].size, _CHUNK):
            chunk = [f[start:start + _CHUNK].astype(np.float32, copy=False) for f in flat]
            if np.any(chunk[0] if len(chunk) == 1 else chunk[0] - chunk[1]):
                return True
        return False

    def read_into(self, name: str, out: np.ndarray) -> None:
        """`read(name)` written into `out` (float32, of its shape) in one pass, with no temporary: the merge fills
        its group stacks so."""
        if self.source is not None:
            np.copyto(out, self.source.read(name), casting="same_kind")
        else:
            np.subtract(self.aligned.read(name), self.harmful.read(name), out=out, dtype=np.float32)

    def read(self, name: str) -> np.ndarray:
        if self.source is not None:
            return self.source.read(name).astype(np.float32, copy=False)
        return self.aligned.read(name).astype(np.float32, copy=False) - self.harmful.read(name).astype(np.float32,
                                                                                                       copy=False)


def _folder_source_from_file(file: Path, what: str) -> TensorSource:
    check_inside(file.parent, file)
    infos, _ = stf.read_header(file)
    handle = open(file, "rb")  # noqa: SIM115 - kept open for the whole merge
    specs = {n: (i.shape, i.dtype) for n, i in infos.items()}
    return TensorSource(what, None, specs, lambda n: stf.map_tensor(handle, infos[n]), file.parent,
                        dict.fromkeys(specs, file))
