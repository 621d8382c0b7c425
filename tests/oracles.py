"""Independent readers used as oracles by several test modules: the safetensors package's view of files."""

from __future__ import annotations

from pathlib import Path

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
