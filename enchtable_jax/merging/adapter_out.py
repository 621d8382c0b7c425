"""A weighted merge of a LoRA task written as a PEFT adapter: the task adapter's factors beside a rank-r safety
correction, for people who serve adapters rather than whole models.

A `Method.weighted` merge (EnchTable) makes each matrix base + τ_task + c·τ_safe with c = w·α one number per tensor.
With τ_task = scale·B·A from the adapter, the merge is itself low rank but for c·τ_safe, which is approximated by
its leading r singular triplets (Eckart–Young: the best rank-r approximation; at r = min(m, n) exact to float32):
B' = [scale·B | c·U_r·S_r], A' = [A ; V_rᵀ]. Every module is written with its scale folded into B' (lora_alpha =
rank, so PEFT's scale is 1), named in full in `rank_pattern` / `alpha_pattern`. The triplets come from the safety
vector's cached decomposition when it holds enough of them (merging/decomposition.py), else from `top_triplets`.
`enchtable_adapter.json` records, per matrix, the rank kept and the fraction of ‖c·τ_safe‖² it carries.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import numpy as np

from enchtable_jax.converters import peft
from enchtable_jax.converters import safetensors_format as stf
from enchtable_jax.converters.atomic import atomic_folder
from enchtable_jax.errors import EnchtableError
from enchtable_jax.kernels.spectral import Triplets, top_triplets
from enchtable_jax.merging.lora import LoraTask
from enchtable_jax.merging.sources import SafetyDelta
from enchtable_jax.options import Range

ADAPTER_RANK = Range(1, integer=True)  # rank of each matrix's safety correction
DEFAULT_ADAPTER_RANK = 64
REPORT = "enchtable_adapter.json"


def check_adapter_task(task: LoraTask | object, weighted: bool, method: str) -> None:
    """Refuse an adapter output (before any work) unless the task is a LoRA adapter and the method's delta is
    τ_task + w·α·τ_safe."""
    if not isinstance(task, LoraTask):
        raise EnchtableError("--adapter-out needs a PEFT LoRA adapter folder as --task (the output adapter extends "
                             "its factors)")
    if not weighted:
        raise EnchtableError(f"--adapter-out: {method}'s delta is not τ_task + w·α·τ_safe per tensor, so it has no "
                             "low-rank correction; use enchtable")


def check_adapter_tensors(merged: Mapping[str, tuple[int, ...]]) -> None:
    """Refuse an adapter output (after pass 1, before pass 2) when a merged tensor is not a matrix."""
    for name, shape in merged.items():
        if len(shape) != 2:
            raise EnchtableError(f"--adapter-out: tensor {name} {list(shape)} changes in the merge but is not a "
                                 "matrix; a LoRA adapter carries matrices only")


def _module(name: str) -> str:
    return name.removesuffix(".weight")


def write_adapter(path: Path, task: LoraTask, safety: SafetyDelta, alpha: float, weights: Mapping[str, float],
                  rank: int, cached: Callable[[str, tuple[int, int]], Triplets | None], overwrite: bool,
                  base_folder: Path | None) -> dict:
    """Write the adapter folder at `path` (published complete, `atomic_folder`): every target of `task`'s adapter
    and every merged matrix (`weights`: name -> w), the latter with its rank-`rank` correction α·w·τ_safe from
    `cached(name, shape)` triplets or computed. Returns the record written as REPORT."""
    tensors: dict[str, np.ndarray] = {}
    ranks, records = {}, []
    decompose = jax.jit(lambda x: top_triplets(x, 1.0))
    for name in sorted(set(task.adapter.targets) | set(weights)):
        module, parts = _module(name), []
        target = task.adapter.targets.get(name)
        if target is not None:
            parts.append(task.factors(name))
        record = {"name": name, "task_rank": 0 if target is None else target.rank, "correction_rank": 0}
        coefficient = np.float32(alpha) * np.float32(weights.get(name, 0.0))
        if name in weights and coefficient != 0:
            tau = safety.read(name).astype(np.float32, copy=False)
            k = min(rank, *tau.shape)
            found = cached(name, tau.shape)
            u, s, v = found if found is not None and found[1].shape[0] >= k else decompose(tau)
            u, s, v = (np.asarray(x, np.float32)[..., :k] for x in (u, s, v))
            parts.append(((u * s) * coefficient, np.ascontiguousarray(v.T)))
            total = float(np.sum(np.square(tau, dtype=np.float64)))
            record.update(correction_rank=k, weight=float(weights[name]),
                          captured=float(np.sum(np.square(s, dtype=np.float64)) / total) if total > 0 else 1.0)
        if not parts:
            continue
        b, a = np.concatenate([p[0] for p in parts], axis=1), np.concatenate([p[1] for p in parts], axis=0)
        if target is not None and target.embedding:  # PEFT stores an embedding's factors transposed (peft.py)
            tensors[f"{peft.PREFIX}{module}.lora_embedding_A"] = np.ascontiguousarray(b.T)
            tensors[f"{peft.PREFIX}{module}.lora_embedding_B"] = np.ascontiguousarray(a.T)
        else:
            tensors[f"{peft.PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(a)
            tensors[f"{peft.PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(b)
        ranks[module] = a.shape[0]
        records.append(record)
    top = max(ranks.values(), default=1)
    patterns = {re.escape(m): r for m, r in ranks.items()}  # full names, escaped: PEFT reads the keys as patterns
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": top, "lora_alpha": top,
              "target_modules": sorted(ranks), "rank_pattern": patterns, "alpha_pattern": patterns,
              "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "use_dora": False, "fan_in_fan_out": False,
              "modules_to_save": None, "init_lora_weights": True, "inference_mode": True,
              "base_model_name_or_path": None if base_folder is None else str(base_folder)}
    report = {"alpha": alpha, "correction_rank": rank, "task_adapter": str(task.adapter.folder), "tensors": records}
    with atomic_folder(path, overwrite) as tmp:
        stf.write_file(tmp / peft.WEIGHTS, list(tensors.items()), lambda x: x, {"format": "pt"})
        (tmp / peft.CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        (tmp / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    return report


__all__ = ["ADAPTER_RANK", "DEFAULT_ADAPTER_RANK", "REPORT", "check_adapter_task", "check_adapter_tensors",
           "write_adapter"]
