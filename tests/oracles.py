"""Independent readers used as oracles by several test modules: the safetensors package's view of files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import safetensors.torch
import torch


def raw_tensors(folder: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """{name: (dtype, shape, raw bytes)} of every safetensors file in `folder`, read by the safetensors package."""
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        for name, t in safetensors.torch.load_file(file).items():
            assert name not in out, f"{name} stored twice"
            out[name] = torch_raw(t)
    assert out, f"no safetensors files in {folder}"
    return out


def torch_raw(t: torch.Tensor) -> tuple[str, tuple[int, ...], bytes]:
    raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return str(t.dtype).removeprefix("torch."), tuple(t.shape), raw


def iota64(task: np.ndarray, safety: np.ndarray, keep: float, scale: float) -> float:
    """ι in float64 by its definition, over the kept triplets whose singular value is not (numerically) zero."""
    def live(x):
        u, s, vt = np.linalg.svd(x, full_matrices=False)
        k = max(1, int(keep * min(x.shape)))
        on = s[:k] > s[0] * max(x.shape) * np.finfo(np.float32).eps
        return u[:, :k][:, on], s[:k][on], vt[:k][on].T

    u1, s1, v1 = live(task)
    u2, s2, v2 = live(safety)
    u, s, v = np.hstack([u1, u2]), np.concatenate([s1, s2]), np.hstack([v1, v2])
    r = len(s)
    residual = (u.T @ u - np.eye(r)) @ np.diag(s) @ (v.T @ v - np.eye(r))
    return scale * np.abs(residual).sum() / r**2
