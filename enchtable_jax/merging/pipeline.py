"""`merge`: safety vector (or aligned − harmful) into a task model, by any registered method; its `MergeResult`."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax

from enchtable_jax.converters.hf import DEFAULT_SHARD_SIZE, HFWriter
from enchtable_jax.converters.model_io import load
from enchtable_jax.converters.outputs import check_output
from enchtable_jax.kernels.host_memory import reuse_freed_memory
from enchtable_jax.merging import decomposition, executor
from enchtable_jax.merging.adapter_out import ADAPTER_RANK, DEFAULT_ADAPTER_RANK, check_adapter_tensors, \
    check_adapter_task, write_adapter
from enchtable_jax.merging.lora import companion_folder, open_task
from enchtable_jax.merging.methods import MERGE_OPTIONS, METHODS, check_strength, method_options
from enchtable_jax.merging.report import peak_rss_bytes, plot_png, report_dict, report_files
from enchtable_jax.merging.sources import SafetyDelta, TensorSource, open_model
from enchtable_jax.models.model import Model
from enchtable_jax.options import check_values

ModelLike = Model | str | Path
_WRITES_AHEAD = 2  # merged tensors waiting for the writer thread, at most
_WRITE_AHEAD_BYTES = 256 * 2**20  # and their bytes, unless a single tensor is larger


@dataclasses.dataclass(frozen=True)
class MergeResult:
    """What `merge` made: the folder it wrote (None for a merge in memory), its report (the content of
    merge_report.json: settings, α, norms, and per tensor what happened, why, and the method's statistics) and the
    merged `Model` (for a merge in memory, or when asked for with `load_model`; else None)."""

    path: Path | None
    report: dict[str, Any]
    model: Model | None


def merge(method: str, base: ModelLike, task: ModelLike, aligned: ModelLike | None = None,
          harmful: ModelLike | None = None, safety_vector: str | Path | None = None, out: str | Path | None = None,
          alpha: float | None = None, beta: float | None = None, seed: int = 0, overwrite: bool = False,
          shard_size: int | str = DEFAULT_SHARD_SIZE, group_bytes: int = executor.DEFAULT_GROUP_BYTES,
          mesh: jax.sharding.Mesh | None = None, progress: bool | None = None, load_model: bool = False,
          extra_files: Mapping[str, bytes | str] | None = None, allow_nonfinite: bool = False,
          cache_decomposition: bool = True, adapter_out: str | Path | None = None,
          adapter_rank: int = DEFAULT_ADAPTER_RANK, **options: Any) -> MergeResult:
    """Merge the safety delta into `task` (fine-tuned from `base`) with `method`; see `METHODS`.

    The safety delta is `safety_vector` (a folder from `distill`) or `aligned` − `harmful`. Models are
    HF folders, orbax checkpoints or loaded `Model`s. α: fixed with `alpha`, else β·‖τ_task‖/‖τ_safe‖
    with `beta` (default 0.1) for adaptive methods, else 1. Returns a `MergeResult` (path, report, model). With
    `out`, the result is streamed into an HF folder (tokenizer files from the task model) with
    `merge_report.json`, `merge_report.png` and `extra_files` (name -> bytes or text), published when complete;
    the model is loaded from it only with `load_model` (on process 0 of a multi-host merge, which writes it).
    Without `out`, the merged model is held in memory and returned. `out` may not be, contain or lie inside an
    input.
    On CPU devices LAPACK runs single-threaded for the merge, one decomposition per device at once: the
    bytes written then do not depend on the device count, and a busy machine does not stall it (see
    `kernels.cpu_threads`; give the process one CPU device per core to use them all).
    A NaN or Inf in an input tensor is an error naming its file and tensor (NonFiniteError); `allow_nonfinite`
    lets such inputs in (α's norms then skip the non-finite entries), but a merged tensor that is not finite is
    refused always, and nothing is written. α and β must be finite and ≥ 0 (MERGE_OPTIONS).
    A method that decomposes the deltas (enchtable, tsv) reads τ_safe's singular triplets from the safety vector's
    cache when it has one, else computes them and, with `cache_decomposition`, stores them in the vector's folder
    for later merges (merging/decomposition.py); the report's `safety_decomposition` says which.
    With `adapter_out` (a weighted method such as enchtable on a LoRA adapter task), the merge is also written as a
    PEFT adapter folder there: the task's factors beside a rank-`adapter_rank` safety correction per matrix
    (merging/adapter_out.py); the report's `adapter` holds its record.
    """
    options = method_options(method, options)
    check_values(MERGE_OPTIONS, alpha=alpha, beta=beta, seed=seed)
    check_strength(method, alpha, beta)
    inputs = {"--base": base, "--task": task, "--aligned": aligned, "--harmful": harmful,
              "--safety-vector": safety_vector}
    if out is not None:
        out = check_output(out, inputs, overwrite)
    if adapter_out is not None:
        check_values({"adapter_rank": ADAPTER_RANK}, adapter_rank=adapter_rank)
        adapter_out = check_output(adapter_out, {**inputs, "--out": out}, overwrite, "--adapter-out")
    with reuse_freed_memory():  # group after group frees and allocates the same large buffers (kernels.host_memory)
        start = time.perf_counter()
        base_src = open_model(base, "base")
        task_src = open_task(task, base_src)
        safety = SafetyDelta(safety_vector, aligned, harmful)
        if adapter_out is not None:
            check_adapter_task(task_src, METHODS[method].weighted, method)
        plan = executor.plan(base_src, task_src, safety, method, alpha, beta, progress, allow_nonfinite)
        mesh = mesh or executor.merge_mesh()
        adapter = None
        if adapter_out is not None:
            check_adapter_tensors({n: t.shape for n, t in plan.tensors.items() if t.merge})
            adapter = functools.partial(_write_adapter, adapter_out, adapter_rank, plan, task_src, safety,
                                        options.get("keep"), overwrite)
        run = functools.partial(executor.run, plan, base_src, task_src, safety, method, options, seed, mesh,
                                group_bytes, progress, allow_nonfinite, cache_decomposition)
        stats: dict[str, Mapping[str, float]] = {}  # the method's statistics per tensor, as the records bring them
        report = functools.partial(_report, plan, stats, method, options, seed, mesh, start,
                                   {"base": str(base_src.folder), "task": str(task_src.folder), "safety": safety.what})
        if out is None:
            records, decomposition = run()
            with contextlib.closing(records):
                model = _in_memory(records, stats, task_src)
            extra = {} if adapter is None else {"adapter": adapter(stats, decomposition)}
            return MergeResult(None, {**report(decomposition), **extra}, model)
        if jax.process_index() != 0:  # the others compute their share of every group; process 0 writes
            records, decomposition = run()
            with contextlib.closing(records):
                for record in records:
                    stats[record.name] = record.stats
            return MergeResult(out, report(decomposition), None)
        layout = executor.output_layout(plan, task_src, group_bytes, mesh.size)
        with HFWriter(out, task_src.config, layout, like=companion_folder(task_src), shard_size=shard_size,
                      overwrite=overwrite, progress=progress, check_finite=False) as writer:  # the executor checks
            # Tensors formed on the host go straight into the output file (`HFWriter.sink`); the others come as
            # arrays. The records' generator is closed before the writer may abort: its worker threads, thread
            # limits and sinks are released at once, whether the merge ends or fails midway.
            records, decomposition = run(sinks=writer.sink)
            with contextlib.closing(records):
                final = _write(writer, records, stats, functools.partial(report, decomposition), extra_files)
        if adapter is not None:  # after the folder: a failure here leaves the merged model complete
            final = {**final, "adapter": adapter(stats, decomposition)}
        return MergeResult(out, final, load(out) if load_model else None)


def _write_adapter(path: Path, rank: int, plan: executor.MergePlan, task: TensorSource, safety: SafetyDelta,
                   keep: float | None, overwrite: bool, stats: Mapping[str, Mapping[str, float]],
                   outcome: Mapping[str, str | None]) -> dict:
    """The merge as a PEFT adapter at `path` (`adapter_out.write_adapter`), τ_safe's triplets read from the safety
    vector's decomposition cache when the merge read or wrote one (`outcome`: what `executor.run` says of it);
    returns the adapter's record, with its folder."""
    cache = None
    if outcome.get("file") is not None:
        cache = decomposition.Cache(safety.folder, keep, outcome["solver"])
    merged = [n for n, t in plan.tensors.items() if t.merge]

    def cached(name: str, shape: tuple[int, int]):
        return cache.read(name, shape) if cache is not None and cache.covers([name]) else None

    record = write_adapter(path, task, safety, plan.alpha, {n: stats[n]["weight"] for n in merged}, rank, cached,
                           overwrite, task.base.folder)
    return {"folder": str(path), **{k: v for k, v in record.items() if k != "tensors"},
            "captured_min": min((t["captured"] for t in record["tensors"] if "captured" in t), default=None)}


def _report(plan: executor.MergePlan, stats: Mapping[str, Mapping[str, float]], method: str, options: dict[str, Any],
            seed: int, mesh: jax.sharding.Mesh, start: float, inputs: dict[str, str],
            decomposition: Mapping[str, str | None]) -> dict[str, Any]:
    """The merge report (merge_report.json) as of now: the plan, the statistics so far and the run's summary."""
    summary = {"inputs": inputs, "seed": seed, "devices": mesh.size, "processes": jax.process_count(),
               "seconds": time.perf_counter() - start, "peak_rss_bytes": peak_rss_bytes(),
               "safety_decomposition": dict(decomposition)}
    return report_dict(plan, stats, method, options, summary)


def _in_memory(records: Iterable[executor.MergedTensor], stats: dict[str, Mapping[str, float]],
               task_src: TensorSource) -> Model:
    """The merged `Model` from the records, its tensors in the task model's order; `stats` filled on the way."""
    params = {}
    for record in records:
        params[record.name], stats[record.name] = record.array, record.stats
    return Model(task_src.config, {n: jax.numpy.asarray(params[n]) for n in task_src.specs if n in params},
                 companion_folder(task_src))


def _write(writer: HFWriter, records: Iterable[executor.MergedTensor], stats: dict[str, Mapping[str, float]],
           report: Callable[[], dict[str, Any]], extra_files: Mapping[str, bytes | str] | None) -> dict[str, Any]:
    """Stream the records into `writer` with the report's files and `extra_files`; `stats` filled on the way.
    Returns the final report."""
    with ThreadPoolExecutor(1) as disk:
        # Writes run on a thread of their own (write(2) releases the GIL), at most _WRITES_AHEAD behind the
        # records: the next tensor is merged while one is written, and the plot is drawn while the last ones
        # and the fsync run.
        # And at most _WRITE_AHEAD_BYTES of them (a larger tensor is written before the next one is made): an 8B
        # model's copied 2 GB embedding and head (mapped, so resident while read and written) are never both held.
        pending: collections.deque = collections.deque()
        for record in records:
            if record.array is not None:  # else its producer wrote it already
                pending.append((disk.submit(writer.add, record.name, record.array), record.array.nbytes))
            stats[record.name] = record.stats
            del record  # the next record is made only once this one's array may go
            while pending and (len(pending) > _WRITES_AHEAD or sum(n for _, n in pending) > _WRITE_AHEAD_BYTES):
                pending.popleft()[0].result()
        png = plot_png(report())
        while pending:
            pending.popleft()[0].result()
        final = report()
        for name, data in {**report_files(final, png), **(extra_files or {})}.items():
            writer.add_file(name, data)
    return final
