"""Reading and writing the safetensors file format, one tensor at a time.

The format is an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
data_offsets}}, then raw little-endian bytes. Doing it here (about a page of code) gives what the
`safetensors` package's numpy path does not (DESIGN.md, Files): float8 through `ml_dtypes`, a header check
that refuses what numpy cannot hold with errors naming the file and tensor, arrays aligned for JAX to adopt
without a copy, and writes that take one tensor at a time. Files written here load with `safetensors` and
transformers.
"""

from __future__ import annotations

import ctypes
import functools
import json
import math
import mmap
import os
import struct
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import BinaryIO

import ml_dtypes
import numpy as np
from enchtable_jax.errors import EnchtableError
from enchtable_jax.safe_io import JSONFileError, parse_json

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32), "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsError(EnchtableError):
    """A safetensors file that is truncated, corrupt or not safetensors at all."""


class TensorInfo:
    """Where one tensor lives in a file."""

    __slots__ = ("name", "dtype", "shape", "start", "end")

    def __init__(self, name: str, dtype: np.dtype, shape: tuple[int, ...], start: int, end: int):
        self.name, self.dtype, self.shape, self.start, self.end = name, dtype, shape, start, end

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: str | Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a file's header without reading tensor data: ({name: info}, metadata).

    At least as strict as the `safetensors` package: header length within bounds, a JSON object with no
    duplicate names, known dtypes, shapes of non-negative ints whose size matches the byte span, and spans
    that are in order, do not overlap and cover the data region exactly, up to the end of the file.
    """
    path = Path(path)
    size = path.stat().st_size
    bad = f"{path}: not a valid safetensors file"
    n, raw = _header_bytes(path, size, bad)
    header = _header_object(raw, bad)
    metadata = _pop_metadata(header, bad)
    data_start = 8 + n
    infos = {name: _tensor_info(path, bad, name, entry, data_start, size) for name, entry in header.items()}
    _check_coverage(bad, infos.values(), data_start, size)
    return infos, metadata


_FIX = "the file is truncated or corrupt; re-download or re-export it"


def _header_bytes(path: Path, size: int, bad: str) -> tuple[int, bytes]:
    """The JSON header's length and bytes, the length checked against the file size and the header size limit."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SafetensorsError(f"{bad} ({size} bytes, shorter than the 8-byte header length); {_FIX}")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            raise SafetensorsError(f"{bad}: header length {n} exceeds the file size {size}"
                                   f"{'' if n <= _MAX_HEADER else f' or the {_MAX_HEADER}-byte limit'}; {_FIX}")
        return n, f.read(n)


def _header_object(raw: bytes, bad: str) -> dict:
    """The header parsed: a JSON object without duplicate names."""
    if not raw.lstrip(b" ").startswith(b"{"):
        raise SafetensorsError(f"{bad}: header does not start with a JSON object; {_FIX}")
    try:
        header = parse_json(raw, "header")
    except JSONFileError as e:
        raise SafetensorsError(f"{bad}: {e}; {_FIX}") from e
    if not isinstance(header, dict):
        raise SafetensorsError(f"{bad}: header is not a JSON object; {_FIX}")
    return header


def _pop_metadata(header: dict, bad: str) -> dict[str, str]:
    """Remove the header's __metadata__ entry and return it ({} when absent or null): strings to strings."""
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SafetensorsError(f"{bad}: field __metadata__ must map strings to strings, got {metadata!r:.200}; {_FIX}")
    return metadata


def _tensor_info(path: Path, bad: str, name: str, entry: object, data_start: int, size: int) -> TensorInfo:
    """One header entry as a `TensorInfo`: its fields well-formed, its byte span the size of its shape and dtype,
    and inside the file."""
    where = f"{bad}: tensor {name!r}"
    dtype_name, shape, (begin, end) = _entry_fields(entry, where)
    try:
        name.encode("utf-8")
    except UnicodeEncodeError as e:
        raise SafetensorsError(f"{bad}: tensor name {name!r:.100} is not valid UTF-8; {_FIX}") from e
    dtype = DTYPES[dtype_name]
    expected = _checked_size(shape, dtype.itemsize)
    if expected is None or not _representable(shape):
        raise SafetensorsError(f"{where}: shape {shape!r:.200} of {dtype_name} overflows 64 bits or has more "
                               f"than {_MAX_DIMS} dimensions; {_FIX}")
    if end < begin or end - begin != expected:
        raise SafetensorsError(f"{where}: declares {end - begin} bytes but shape {tuple(shape)} of {dtype_name} "
                               f"needs {expected}; {_FIX}")
    if data_start + end > size:
        raise SafetensorsError(f"{path}: tensor {name!r} ends at byte {data_start + end} but the file has "
                               f"{size} bytes; {_FIX}")
    return TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end)


def _entry_fields(entry: object, where: str) -> tuple[str, list[int], list[int]]:
    """(dtype, shape, data_offsets) of a header entry: an object with a known dtype, a shape of non-negative
    integers and two non-negative integer offsets."""
    if not isinstance(entry, dict):
        raise SafetensorsError(f"{where}: entry must be an object, got {entry!r:.200}; {_FIX}")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in entry]
    if missing:
        raise SafetensorsError(f"{where}: entry lacks the field(s) {', '.join(missing)}; {_FIX}")
    dtype_name, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        raise SafetensorsError(f"{where}: field dtype {dtype_name!r:.100} is not a known dtype "
                               f"({', '.join(DTYPES)}); {_FIX}")
    if not isinstance(shape, list) or not all(_is_uint(s) for s in shape):
        raise SafetensorsError(f"{where}: field shape must be a list of non-negative integers, got "
                               f"{shape!r:.200}; {_FIX}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_uint(o) for o in offsets):
        raise SafetensorsError(f"{where}: field data_offsets must be two non-negative integers, got "
                               f"{offsets!r:.200}; {_FIX}")
    return dtype_name, shape, offsets


def _check_coverage(bad: str, infos: Iterable[TensorInfo], data_start: int, size: int) -> None:
    """Refuse spans that overlap, leave gaps, or do not end at the end of the file."""
    covered = 0
    for begin, end, name in sorted((i.start - data_start, i.end - data_start, i.name) for i in infos):
        if begin != covered:
            what = "overlaps the previous tensor" if begin < covered else f"leaves a gap of {begin - covered} bytes"
            raise SafetensorsError(f"{bad}: tensor {name!r} starts at data offset {begin}, which {what}; tensors "
                                   f"must cover the data region contiguously; {_FIX}")
        covered = end
    if data_start + covered != size:
        raise SafetensorsError(f"{bad}: the tensors cover {covered} bytes of data but the file holds "
                               f"{size - data_start}; {_FIX}")


_U64 = 2 ** 64


def _is_uint(value: object) -> bool:
    """A JSON integer that is an unsigned 64-bit value (what the format's `usize` fields hold)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < _U64


_MAX_DIMS = 32  # numpy's limit is 64; no model tensor comes near either


def _representable(shape: list[int]) -> bool:
    """A shape numpy can allocate: few enough dimensions, and the product of its non-zero ones within int64."""
    total = 1
    for dim in shape:
        total *= dim or 1
    return len(shape) <= _MAX_DIMS and total < 2 ** 63


def _checked_size(shape: list[int], itemsize: int) -> int | None:
    """Bytes of a tensor, or None when any partial product overflows 64 bits (as the Rust reader checks)."""
    total = 1
    for dim in shape:
        total *= dim
        if total >= _U64:
            return None
    total *= itemsize
    return total if total < _U64 else None


ALIGNMENT = 64  # bytes: JAX's CPU client adopts host buffers aligned like this instead of copying them


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised array whose data starts on an ALIGNMENT-byte boundary."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + ALIGNMENT, np.uint8)
    skip = -raw.ctypes.data % ALIGNMENT
    return raw[skip:skip + nbytes].view(dtype).reshape(shape)


def read_tensor(f: BinaryIO, info: TensorInfo) -> np.ndarray:
    """Read one tensor's bytes into a fresh, 64-byte aligned array (no memory map kept alive)."""
    out = aligned_empty(info.shape, info.dtype)
    f.seek(info.start)
    view = memoryview(out.reshape(-1).view(np.uint8))
    if f.readinto(view) != info.nbytes:
        raise SafetensorsError(f"{getattr(f, 'name', 'file')}: tensor {info.name} is truncated")
    return out


def map_tensor(f: BinaryIO, info: TensorInfo) -> np.ndarray:
    """A read-only view of one tensor's bytes through a memory map of its pages alone, unmapped once the array is
    dropped: no copy into fresh pages, for a reader that copies the tensor into something else anyway (the merge
    fills its stacks from three models; SmolLM2-135M's 540 MB into float32 stacks: 0.11 s mapped, 0.12 s read,
    best of 7 on the shared 2-core machine). Like any map, it assumes the file is not cut short while in use."""
    if info.nbytes == 0:
        return read_tensor(f, info)
    start = info.start - info.start % mmap.ALLOCATIONGRANULARITY
    try:
        pages = mmap.mmap(f.fileno(), info.end - start, access=mmap.ACCESS_READ, offset=start)
    except ValueError as error:  # the file shrank since its header was read
        raise SafetensorsError(f"{getattr(f, 'name', 'file')}: tensor {info.name} is truncated") from error
    return np.frombuffer(pages, info.dtype, math.prod(info.shape), info.start - start).reshape(info.shape)


def header_bytes(tensors: Iterable[tuple[str, np.dtype, tuple[int, ...]]], metadata: Mapping[str, str]) -> bytes:
    """Length prefix + JSON header, padded with spaces to an 8-byte boundary, for tensors in this order."""
    header: dict = {"__metadata__": dict(metadata)}
    offset = 0
    for name, dtype, shape in tensors:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": DTYPE_NAMES[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


_WRITEBACK_BYTES = 1 << 20


@functools.cache
def _sync_file_range() -> Callable[..., int] | None:
    """Linux's sync_file_range(2), or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return fn


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing a just-written byte range to disk, without waiting for it (Linux's
    sync_file_range with SYNC_FILE_RANGE_WRITE; elsewhere nothing): a later fsync finds those pages written or on
    their way. The write-back runs on the kernel's time while the caller computes the next tensor; a merge's fsync
    otherwise waited for all its bytes at the end."""
    fn = _sync_file_range()
    if fn is not None:
        fn(fd, offset, nbytes, 2)  # SYNC_FILE_RANGE_WRITE; a failure leaves the fsync to do it all


class FileWriter:
    """One safetensors file written tensor by tensor: the header first (shapes and dtypes are known up front),
    then each tensor's bytes at its place as it arrives, in any order, so no tensor waits on the host for the
    others: whole (`add`) or piece by piece from any thread (`sink`). Positional writes throughout, so nothing
    depends on a file position shared between threads."""

    def __init__(self, path: str | Path, tensors: Iterable[tuple[str, object]], metadata: Mapping[str, str]):
        specs = [(name, np.dtype(arr.dtype), tuple(arr.shape)) for name, arr in tensors]
        for name, dtype, _ in specs:
            if dtype not in DTYPE_NAMES:
                raise TypeError(f"tensor {name}: dtype {dtype} cannot be stored in safetensors")
        self.path = Path(path)
        header = header_bytes(specs, metadata)
        self._pending: dict[str, tuple[np.dtype, tuple[int, ...], int]] = {}
        offset = len(header)
        for name, dtype, shape in specs:
            self._pending[name] = (dtype, shape, offset)
            offset += int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        self._sinks = 0  # sinks handed out and not yet closed
        self._lock = threading.Lock()  # sinks close on their writers' threads
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        _write_all(self._fd, memoryview(header), 0)

    @property
    def done(self) -> bool:
        return not self._pending and not self._sinks

    def _take(self, name: str, dtype: np.dtype | None, shape: tuple[int, ...] | None, sink: bool = False) -> tuple:
        """(dtype, shape, offset) of tensor `name`, which must be pending (with this dtype and shape unless None); no
        longer pending, and counted as an open sink with `sink`."""
        with self._lock:
            expected = self._pending.get(name)
            if expected is not None and (dtype is None or (dtype, shape) == expected[:2]):
                del self._pending[name]
                self._sinks += sink
                return expected
            raise RuntimeError(f"{self.path}: got tensor {name} {dtype} {shape}, expected one of "
                               f"the {len(self._pending)} tensor(s) not yet written "
                               f"({', '.join(f'{n} {d} {s}' for n, (d, s, _) in list(self._pending.items())[:3])})")

    def add(self, name: str, array: np.ndarray) -> None:
        """Write one tensor of the header, not yet written, at its offset."""
        offset = self._take(name, array.dtype, tuple(array.shape))[2]
        data = memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
        _write_all(self._fd, data, offset)
        if data.nbytes >= _WRITEBACK_BYTES:  # start writing it to disk now: the fsync in `close` then waits less
            start_writeback(self._fd, offset, data.nbytes)

    def sink(self, name: str, then: Callable[[], None] | None = None) -> TensorSink:
        """A `TensorSink` for tensor `name` (pending), which its writer fills piece by piece and then closes (that
        calls `then`); the file is `done` once every tensor was added or sunk and every sink closed."""
        dtype, shape, offset = self._take(name, None, None, sink=True)

        def closed() -> None:
            with self._lock:
                self._sinks -= 1
            if then is not None:
                then()

        return TensorSink(os.dup(self._fd), offset, dtype, shape, closed)

    def close(self) -> None:
        """Close the file, synced to disk if every tensor was written."""
        if self._fd < 0:
            return
        if self.done:
            os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1


class TensorSink:
    """One tensor's bytes, written in pieces at their places (`write`) by whoever computes them, from any thread: a
    merge writes each chunk from a small buffer straight into the file instead of making the tensor and copying it.
    Holds a file descriptor of its own, so that closing or abandoning the file cannot redirect a late write."""

    def __init__(self, fd: int, offset: int, dtype: np.dtype, shape: tuple[int, ...], on_close: Callable[[], None]):
        self.dtype, self.shape, self.size = dtype, shape, math.prod(shape)
        self._fd, self._offset, self._on_close = fd, offset, on_close

    def write(self, start: int, values: np.ndarray) -> None:
        """Write `values` (this tensor's dtype, contiguous) as entries start, start + 1, ... of the flat tensor."""
        if values.dtype != self.dtype or not 0 <= start <= start + values.size <= self.size:
            raise RuntimeError(f"sink of {self.dtype} {self.shape}: got {values.size} {values.dtype} entries at "
                               f"{start}")
        _write_all(self._fd, memoryview(np.ascontiguousarray(values).reshape(-1).view(np.uint8)),
                   self._offset + start * self.dtype.itemsize)

    def close(self) -> None:
        """The tensor is complete: start its write-back (as `FileWriter.add`) and release the descriptor."""
        if self._fd < 0:
            return
        nbytes = self.size * self.dtype.itemsize
        if nbytes >= _WRITEBACK_BYTES:
            start_writeback(self._fd, self._offset, nbytes)
        os.close(self._fd)
        self._fd = -1
        self._on_close()


def _write_all(fd: int, data: memoryview, offset: int) -> None:
    """pwrite all of `data` at `offset` (a short write continues where it stopped)."""
    while data.nbytes:
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


def write_file(path: str | Path, tensors: list[tuple[str, object]], fetch, metadata: Mapping[str, str]) -> None:
    """Write `tensors` [(name, array-like with .shape/.dtype)] to `path`, pulling each array's bytes through
    `fetch(array) -> np.ndarray` only when it is written, so a shard never needs all its tensors on the host."""
    writer = FileWriter(path, tensors, metadata)
    try:
        for name, arr in tensors:
            writer.add(name, fetch(arr))
    finally:
        writer.close()
