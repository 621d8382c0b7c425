"""A plain PyTorch reference of the `enchtable` merge on HF folders, for side-by-side speed comparisons.

The same math as `merge('enchtable', ...)` (DESIGN §3), written the obvious way in eager PyTorch:

1. pass 1 over the task model's tensors: a tensor is merged when the base has it with the same shape
   and the safety delta has a non-zero tensor of that shape; the global norms ‖τ_task‖ and ‖τ_safe‖
   over the merged tensors (float64 sums) give α = β·‖τ_task‖/‖τ_safe‖ (β = 0.1), unless α is given;
2. pass 2, tensor by tensor: τ_task = task − base and α·τ_safe in float32; for a 2-D tensor one
   `torch.linalg.svd(full_matrices=False)` of each, the top k = ⌊γ·min(m, n)⌋ triplets kept (γ = 0.5),
   interference by the block formula ι = scale·(Σ|A S2 Bᵀ| + Σ|Aᵀ S1 B|)/r² with A = U1ᵀU2,
   B = V1ᵀV2, r = k1 + k2, weight w = exp(−ι), where triplets with σ ≤ max(m, n)·ε·σ1 (numerically zero,
   their singular vectors arbitrary) are dropped from U, S, V and from k; other tensors get w = 1;
   merged = base + (τ_task + w·α·τ_safe), cast back to the task's dtype; tensors that are not merged
   are the task's, unchanged;
3. written with `safetensors.torch.save_file`, in shards of at most `shard_size` bytes (an HF index
   when there is more than one), next to the task folder's other files (config, tokenizer).

Nothing is deliberately slow: torch runs on all its intra-op threads; the only shortcut taken is one
that ours takes too (`kernels.spectral.thin_svd`): a wide matrix is decomposed through its transpose
(`transpose_wide=False` gives the literal per-tensor SVD). It is deliberately plain too: one tensor
at a time, no batching of same-shaped tensors, no Gram-matrix or randomized shortcuts.

This module imports only torch, safetensors, numpy and the standard library (the bench loads it in a
fresh process without JAX to measure its peak memory).
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

SAFETY_TENSORS = "safety_vector.safetensors"  # = converters.safety_vector.TENSORS
INDEX = "model.safetensors.index.json"
WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".msgpack", ".h5")


class SafetensorsFolder:
    """The tensors of an HF folder (or one .safetensors file), each read on demand."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if path.is_file():
            files = [path]
        elif (path / INDEX).is_file():
            weight_map = json.loads((path / INDEX).read_text())["weight_map"]
            files = [path / f for f in dict.fromkeys(weight_map.values())]
        else:
            files = [path / "model.safetensors"]
        self._handles = [safe_open(str(f), framework="pt") for f in files]
        self.where: dict[str, Any] = {}
        for handle in self._handles:
            for name in handle.keys():  # noqa: SIM118 - a safe_open handle, not a dict
                self.where[name] = handle

    def names(self) -> list[str]:
        return list(self.where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.where[name].get_slice(name).get_shape())

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.where[name].get_tensor(name)


class _Arrays:
    """Given τ_safe arrays (numpy or torch) behind the same interface."""

    def __init__(self, arrays: Mapping[str, Any]):
        self._arrays = {n: torch.as_tensor(np.asarray(a)) if not isinstance(a, torch.Tensor) else a
                        for n, a in arrays.items()}

    def names(self) -> list[str]:
        return list(self._arrays)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._arrays[name].shape)

    def __contains__(self, name: str) -> bool:
        return name in self._arrays

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._arrays[name]


def top_triplets(x: torch.Tensor, keep: float, transpose_wide: bool = True):
    """U [m, k], S [k], V [n, k]: the leading k = ⌊keep·min(m, n)⌋ (≥ 1) singular triplets (float32)."""
    x = x.float()
    if transpose_wide and x.shape[0] < x.shape[1]:
        v, s, uh = torch.linalg.svd(x.T, full_matrices=False)
        u, vh = uh.T, v.T
    else:
        u, s, vh = torch.linalg.svd(x, full_matrices=False)
    k = max(1, int(keep * min(x.shape)))
    live = s[:k] > s[0] * max(x.shape) * torch.finfo(torch.float32).eps  # numerically zero σ: dropped
    return u[:, :k][:, live], s[:k][live], vh[:k][live].T


def interference(task: torch.Tensor, scaled_safety: torch.Tensor, keep: float = 0.5, scale: float = 200.0,
                 transpose_wide: bool = True) -> torch.Tensor:
    """ι of two 2-D deltas (the safety one already scaled by α), by the block-diagonal formula."""
    u1, s1, v1 = top_triplets(task, keep, transpose_wide)
    u2, s2, v2 = top_triplets(scaled_safety, keep, transpose_wide)
    r = max(1, s1.shape[0] + s2.shape[0])
    a = u1.T @ u2
    b = v1.T @ v2
    total = torch.sum(torch.abs((a * s2) @ b.T)) + torch.sum(torch.abs((a.T * s1) @ b))
    return scale * total / r**2


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    text = size.strip().upper()
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


@torch.no_grad()
def merge(base: str | Path, task: str | Path, out: str | Path, safety_vector: str | Path | None = None,
          safety: Mapping[str, Any] | None = None, alpha: float | None = None, beta: float = 0.1,
          keep: float = 0.5, interference_scale: float = 200.0, shard_size: int | str = "5GB",
          overwrite: bool = False, transpose_wide: bool = True) -> dict[str, Any]:
    """EnchTable merge of HF folders `base` and `task` with τ_safe from `safety_vector` (a folder holding
    safety_vector.safetensors) or `safety` ({name: array}); writes an HF folder at `out`.

    Returns {"alpha", "norms", "weights": {name: w}, "interference": {name: ι}} of the merged tensors.
    """
    if (safety_vector is None) == (safety is None):
        raise ValueError("give either safety_vector or safety")
    out = Path(out)
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} exists (overwrite=False)")
        shutil.rmtree(out)
    base_t, task_t = SafetensorsFolder(base), SafetensorsFolder(task)
    safe_t = SafetensorsFolder(Path(safety_vector) / SAFETY_TENSORS) if safety is None else _Arrays(safety)

    # Pass 1: which tensors are merged, and the global norms for α.
    merged_names = []
    sum_task = sum_safe = 0.0
    for name in task_t.names():
        shape = task_t.shape(name)
        if name not in base_t or base_t.shape(name) != shape or name not in safe_t or safe_t.shape(name) != shape:
            continue
        tau_safe = safe_t[name]
        if not torch.any(tau_safe != 0):
            continue
        merged_names.append(name)
        delta = task_t[name].double() - base_t[name].double()
        sum_task += float(torch.sum(delta * delta))
        sum_safe += float(torch.sum(tau_safe.double() ** 2))
    norms = {"task": math.sqrt(sum_task), "safety": math.sqrt(sum_safe)}
    if alpha is None:
        alpha = beta * norms["task"] / norms["safety"] if norms["safety"] > 0 else 0.0
    merged_set = set(merged_names)

    # Pass 2: merge tensor by tensor, written in shards.
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    limit = _parse_size(shard_size)
    weights, iotas = {}, {}
    shards: list[list[str]] = []
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = 0
    weight_map: dict[str, str] = {}
    written: list[str] = []
    sizes: dict[str, int] = {}

    def flush():
        nonlocal shard, shard_bytes
        if shard:
            file = f"model-part-{len(written):05d}.safetensors"
            save_file(shard, str(tmp / file), metadata={"format": "pt"})
            written.append(file)
            shards.append(list(shard))
        shard, shard_bytes = {}, 0

    for name in task_t.names():
        t = task_t[name]
        if name in merged_set:
            b = base_t[name].float()
            tau = t.float() - b
            scaled = alpha * safe_t[name].float()
            if tau.ndim == 2:
                iota = interference(tau, scaled, keep, interference_scale, transpose_wide)
                w = torch.exp(-iota)
                weights[name], iotas[name] = float(w), float(iota)
            else:
                w = 1.0
                weights[name] = 1.0
            t = (b + (tau + w * scaled)).to(t.dtype)
        nbytes = sizes[name] = t.numel() * t.element_size()
        if shard and shard_bytes + nbytes > limit:
            flush()
        shard[name] = t.contiguous()
        shard_bytes += nbytes
    flush()
    # HF names: one file model.safetensors, or model-0000i-of-0000n.safetensors with an index.
    if len(written) == 1:
        (tmp / written[0]).rename(tmp / "model.safetensors")
    else:
        n = len(written)
        for i, (file, names) in enumerate(zip(written, shards)):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (tmp / file).rename(tmp / final)
            weight_map.update({name: final for name in names})
        total = sum(sizes.values())
        (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    task_dir = Path(task)
    if task_dir.is_dir():
        for f in task_dir.iterdir():
            if f.is_file() and not f.name.endswith(WEIGHTS) and f.name != INDEX:
                shutil.copy2(f, tmp / f.name)
    tmp.rename(out)
    return {"alpha": float(alpha), "norms": norms, "weights": weights, "interference": iotas}
