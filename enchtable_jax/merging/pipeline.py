"""`merge`: safety vector (or aligned − harmful) into a task model, by any registered method."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from enchtable_jax.converters.hf import DEFAULT_SHARD_SIZE, HFWriter
from enchtable_jax.converters.model_io import load
from enchtable_jax.converters.outputs import check_output
from enchtable_jax.merging import executor
from enchtable_jax.merging.methods import MERGE_OPTIONS, check_strength, method_options
from enchtable_jax.merging.report import peak_rss_bytes, report_dict, report_files
from enchtable_jax.merging.sources import SafetyDelta, open_model
from enchtable_jax.models.model import Model
from enchtable_jax.options import check_values

ModelLike = Model | str | Path


def merge(method: str, base: ModelLike, task: ModelLike, aligned: ModelLike | None = None,
          harmful: ModelLike | None = None, safety_vector: str | Path | None = None, out: str | Path | None = None,
          alpha: float | None = None, beta: float | None = None, seed: int = 0, overwrite: bool = False,
          shard_size: int | str = DEFAULT_SHARD_SIZE, group_bytes: int = executor.DEFAULT_GROUP_BYTES,
          mesh: jax.sharding.Mesh | None = None, progress: bool | None = None, return_model: bool = True,
          extra_files: Mapping[str, bytes | str] | None = None, allow_nonfinite: bool = False,
          **options: Any) -> Model | None:
    """Merge the safety delta into `task` (fine-tuned from `base`) with `method`; see `METHODS`.

    The safety delta is `safety_vector` (a folder from `distill`) or `aligned` − `harmful`. Models are
    HF folders, orbax checkpoints or loaded `Model`s. α: fixed with `alpha`, else β·‖τ_task‖/‖τ_safe‖
    with `beta` (default 0.1) for adaptive methods, else 1. With `out`, the result is streamed into an
    HF folder (tokenizer files from the task model) with `merge_report.json` and `merge_report.png`,
    and returned loaded unless `return_model=False`; without it, the merged Model is returned. `out` may
    not be, contain or lie inside an input; `extra_files` (name -> bytes or text) are added to the output folder
    before it is published.
    On CPU devices LAPACK runs single-threaded for the merge, one decomposition per device at once: the
    bytes written then do not depend on the device count, and a busy machine does not stall it (see
    `kernels.cpu_threads`; give the process one CPU device per core to use them all).
    A NaN or Inf in an input tensor is an error naming its file and tensor (NonFiniteError); `allow_nonfinite`
    lets such inputs in (α's norms then skip the non-finite entries), but a merged tensor that is not finite is
    refused always, and nothing is written. α and β must be finite and ≥ 0 (MERGE_OPTIONS).
    """
    options = method_options(method, options)
    check_values(MERGE_OPTIONS, alpha=alpha, beta=beta, seed=seed)
    check_strength(method, alpha, beta)
    if out is not None:
        out = check_output(out, {"--base": base, "--task": task, "--aligned": aligned, "--harmful": harmful,
                                 "--safety-vector": safety_vector}, overwrite)
    start = time.perf_counter()
    base_src, task_src = open_model(base, "base"), open_model(task, "task")
    safety = SafetyDelta(safety_vector, aligned, harmful)
    plan = executor.plan(base_src, task_src, safety, method, alpha, beta, progress, allow_nonfinite)
    mesh = mesh or executor.merge_mesh()
    order, produced = executor.run(plan, base_src, task_src, safety, method, options, seed, mesh,
                                   group_bytes, progress, allow_nonfinite)
    if out is None:
        params = {name: np.asarray(arr) for name, arr in produced}
        params = {name: params[name] for name in task_src.specs if name in params}  # the task model's order
        return Model(task_src.config, {n: jax.numpy.asarray(v) for n, v in params.items()}, task_src.folder)
    if jax.process_index() != 0:  # the others compute their share of every group
        for _ in produced:
            pass
        return None
    specs = {name: jax.ShapeDtypeStruct(shape, dtype) for name, shape, dtype in order}
    with HFWriter(out, task_src.config, specs, like=task_src.folder, shard_size=shard_size, overwrite=overwrite,
                  progress=progress, check_finite=False) as writer:  # the executor checked them
        for name, arr in produced:
            writer.add(name, arr)
        summary = {"inputs": {"base": str(base_src.folder), "task": str(task_src.folder), "safety": safety.what},
                   "seed": seed, "devices": mesh.size, "processes": jax.process_count(),
                   "seconds": time.perf_counter() - start,
                   "peak_rss_bytes": peak_rss_bytes()}
        for name, data in {**report_files(report_dict(plan, method, options, summary)), **(extra_files or {})}.items():
            writer.add_file(name, data)
    return load(out) if return_model else None
