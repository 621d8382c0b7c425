"""The safety vector's cached decomposition: the kept singular triplets of τ_safe, stored beside the vector.

A safety vector serves every fine-tune of its base, and the SVD of τ_safe does not depend on the task model: the
first merge that decomposes it (by an exact solver: kernels/spectral.EXACT_SOLVERS) writes the triplets into the
vector's folder, and every later merge and calibration sweep with that solver reads them instead of decomposing
again, which halves the decompositions of an EnchTable merge.
The file is named by the keep fraction, the solver (unless it is the SVD, as earlier versions wrote) and the
SHA-256 of safety_vector.safetensors and records that digest, so an edited vector never meets a stale
decomposition; a cache kept for a larger fraction serves a smaller one (the
triplets are sorted). It is a new file, renamed into place complete, never over another one; where the folder is
not writable the merge computes the triplets in memory as before.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path

import jax
import numpy as np

from enchtable_jax.converters import safetensors_format as stf
from enchtable_jax.converters.atomic import OutputExistsError, recover, rename_noreplace
from enchtable_jax.converters.safety_vector import TENSORS
from enchtable_jax.errors import EnchtableError
from enchtable_jax.kernels.spectral import kept
from enchtable_jax.merging.base_digest import file_sha256
from enchtable_jax.safe_io import check_inside

FORMAT = "enchtable-safety-svd"
_PARTS = ("U", "S", "V")
_NAME = re.compile(r"safety_svd\.keep-(?P<keep>[0-9.]+)\.(?:(?P<solver>[a-z][a-z0-9]*)\.)?(?P<digest>[0-9a-f]{16})"
                   r"\.safetensors")
_LEGACY_SOLVER = "svd"  # the solver of a file whose name names none (all that earlier versions wrote)


def file_name(keep: float, digest: str, solver: str = _LEGACY_SOLVER) -> str:
    """The cache file's name for triplets kept at fraction `keep` of the vector whose file has SHA-256 `digest`,
    computed by `solver` (named unless it is the exact SVD, as earlier versions named their files)."""
    named = "" if solver == _LEGACY_SOLVER else f"{solver}."
    return f"safety_svd.keep-{keep:g}.{named}{digest[:16]}.safetensors"


def triplet_shapes(shape: tuple[int, int], keep: float) -> dict[str, tuple[int, ...]]:
    """{part: shape} of one matrix's stored triplets: U [m, k], S [k], V [n, k] with k = kept(shape, keep)."""
    k = kept(shape, keep)
    return {"U": (shape[0], k), "S": (k,), "V": (shape[1], k)}




class Cache:
    """The decomposition cache of one safety-vector folder for one keep fraction and solver (each exact solver's
    triplets are their own: a merge's bytes do not depend on whether they were cached), found once the vector's
    digest (computed on a worker thread from construction on) is known."""

    def __init__(self, folder: str | Path, keep: float, solver: str = _LEGACY_SOLVER):
        self.folder, self.keep, self.solver = Path(folder), float(keep), solver
        pool = concurrent.futures.ThreadPoolExecutor(1)
        self._digest = pool.submit(file_sha256, self.folder / TENSORS)  # beside pass 1's reads
        pool.shutdown(wait=False)
        self._found: tuple[Path, dict[str, stf.TensorInfo]] | None | bool = False
        self._handle = None

    @property
    def digest(self) -> str:
        return self._digest.result()

    def find(self) -> Path | None:
        """The cache file for this vector with the smallest keep ≥ ours, or None."""
        if self._found is False:
            self._found = self._lookup()
        return None if self._found is None else self._found[0]

    def _lookup(self) -> tuple[Path, dict[str, stf.TensorInfo]] | None:
        digest = self.digest
        candidates = []
        for path in self.folder.glob("safety_svd.keep-*.safetensors"):
            match = _NAME.fullmatch(path.name)
            if match and match["digest"] == digest[:16] and float(match["keep"]) >= self.keep \
                    and (match["solver"] or _LEGACY_SOLVER) == self.solver:
                candidates.append((float(match["keep"]), path))
        for _, path in sorted(candidates):
            check_inside(self.folder, path)
            infos, metadata = stf.read_header(path)
            if metadata.get("format") == FORMAT and metadata.get("vector_sha256") == digest \
                    and metadata.get("solver", _LEGACY_SOLVER) == self.solver:
                return path, infos
        return None

    def covers(self, names: Iterable[str]) -> bool:
        """Whether the cache file holds the triplets of every one of `names`."""
        if self.find() is None:
            return False
        infos = self._found[1]
        return all(f"{name}.{part}" in infos for name in names for part in _PARTS)

    def read(self, name: str, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(U, S, V) of matrix `name` for our keep (the stored ones sliced when kept for a larger fraction)."""
        path, infos = self._found
        k = kept(shape, self.keep)
        if self._handle is None:
            self._handle = open(path, "rb")  # noqa: SIM115 - kept open for the merge, like the models' files
        # Views of the file's pages (no copy): the caller stacks them into one group array, the only copy.
        u, s, v = (stf.map_tensor(self._handle, infos[f"{name}.{part}"]) for part in _PARTS)
        if u.shape[0] != shape[0] or v.shape[0] != shape[1] or s.shape[0] < k:
            raise EnchtableError(f"{path}: triplets of {name} have shapes {u.shape}, {s.shape}, {v.shape}, not "
                                 f"those of a {shape} matrix at keep {self.keep:g}; delete the file to recompute it")
        return u[:, :k], s[:k], v[:, :k]

    def writer(self, shapes: dict[str, tuple[int, int]]) -> Writer | None:
        """A writer of a new cache file holding the triplets of `shapes` ({name: matrix shape}), or None when the
        folder cannot take one (read-only, or a file of this name appeared)."""
        path = self.folder / file_name(self.keep, self.digest, self.solver)
        specs = [(f"{name}.{part}", jax.ShapeDtypeStruct(s, np.float32)) for name, shape in shapes.items()
                 for part, s in triplet_shapes(shape, self.keep).items()]
        try:
            recover(path)  # the temporary files of killed merges, named as every output's (converters/atomic.py)
            if path.exists():
                return None
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=self.folder)
        except OSError:
            return None
        os.close(fd)
        try:
            os.chmod(tmp, 0o644)  # mkstemp makes it private; the published file should read like the vector's
            files = stf.FileWriter(tmp, specs, {"format": FORMAT, "vector_sha256": self.digest,
                                                "keep": f"{self.keep:g}", "solver": self.solver})
        except OSError:
            Path(tmp).unlink(missing_ok=True)
            return None
        return Writer(files, Path(tmp), path)


class Writer:
    """Streams triplets into the temporary cache file; `commit` renames it into place once every matrix is in."""

    def __init__(self, files: stf.FileWriter, tmp: Path, path: Path):
        self._files, self._tmp, self.path = files, tmp, path

    def add(self, name: str, triplets: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
        for part, array in zip(_PARTS, triplets, strict=True):
            self._files.add(f"{name}.{part}", np.asarray(array, np.float32))

    def commit(self) -> Path | None:
        """Publish the file (synced) if complete; None when it was not (then it is removed)."""
        complete = self._files.done
        self._files.close()
        if complete:
            try:
                rename_noreplace(self._tmp, self.path)
                return self.path
            except (OutputExistsError, OSError):
                pass
        self._tmp.unlink(missing_ok=True)
        return None

    def abort(self) -> None:
        self._files.close()
        self._tmp.unlink(missing_ok=True)
