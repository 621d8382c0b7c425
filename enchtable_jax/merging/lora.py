"""A LoRA task model: a base model plus a PEFT adapter, merged as the model it stands for without forming it.

The task model is base + scale·B·A on the tensors the adapter covers and the base elsewhere. The merge reads
τ_task of a covered tensor as its factors (scale·B [m, r], A [r, n]): exact (no task − base rounding), r·(m + n)
numbers instead of m·n, and their product's singular triplets come from the factors (kernels/factored.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from enchtable_jax.converters.peft import LoraAdapter, is_adapter, open_adapter
from enchtable_jax.merging.sources import TensorSource, open_model
from enchtable_jax.models.model import Model


class LoraTask(TensorSource):
    """The task model base + scale·B·A: the base's names, shapes and dtypes; `read` is the merged tensor (rounded
    once to the base's dtype) where the adapter covers it, else the base's bytes; `factors` gives τ_task exactly."""

    def __init__(self, base: TensorSource, adapter: LoraAdapter):
        super().__init__("task", base.config, base.specs, self._read, adapter.folder)
        self.base, self.adapter = base, adapter

    def where(self, name: str) -> str:
        """The adapter's weights file for a tensor it covers, else where the base stores the tensor."""
        return f"task adapter {self.adapter.weights}" if name in self.adapter.targets else self.base.where(name)

    def _read(self, name: str) -> np.ndarray:
        if name not in self.adapter.targets:
            return self.base.read(name)
        merged = self.base.read(name).astype(np.float32)
        merged += self.adapter.delta(name)
        return merged.astype(self.specs[name][1], copy=False)

    def factors(self, name: str) -> tuple[np.ndarray, np.ndarray] | None:
        """(scale·B [m, r], A [r, n]) float32 of τ_task[name], or None for a tensor the adapter leaves alone."""
        return self.adapter.factors(name) if name in self.adapter.targets else None

    def rank(self, name: str) -> int | None:
        """The rank of τ_task[name]'s factors, or None for a tensor the adapter leaves alone."""
        target = self.adapter.targets.get(name)
        return None if target is None else target.rank


def open_lora_task(base: TensorSource, adapter: str | Path) -> LoraTask:
    """The task model of a PEFT adapter folder over `base`, its factors checked against the base's shapes."""
    return LoraTask(base, open_adapter(adapter, {n: shape for n, (shape, _) in base.specs.items()}))


def open_task(task: Model | str | Path, base: TensorSource) -> TensorSource:
    """The task model: a PEFT adapter folder (it holds adapter_config.json) over `base`, else the model itself."""
    if not isinstance(task, Model) and is_adapter(Path(task).expanduser()):
        return open_lora_task(base, task)
    return open_model(task, "task")


def companion_folder(task: TensorSource) -> Path | None:
    """Where the merged model's tokenizer and generation files come from: the task model's folder, or for an adapter
    its base's (an adapter folder holds the adapter's files, which must not describe the merged model)."""
    return task.base.folder if isinstance(task, LoraTask) else task.folder


__all__ = ["LoraTask", "companion_folder", "open_lora_task", "open_task"]
