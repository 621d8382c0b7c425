"""Safety-vector distillation: NTK-linearized fine-tuning of the aligned model on harmful data.

θ0 = θ_aligned. The scope's tensors θ are trained (float32 master weights, AdamW with warm-up and
cosine decay, gradient clipping and accumulation) through f(θ0) + J(θ0)(θ − θ0); the result is
τ_safe = θ0 − θ_harm on the scope. Runs on every device of a ('data', 'fsdp') mesh, across hosts
when `jax.distributed` is initialised, and resumes exactly from orbax checkpoints: the loop is
`training.loop.train`, which `finetune` shares.
"""

from __future__ import annotations

import dataclasses
import datetime
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from enchtable_jax import api
from enchtable_jax.converters.atomic import OutputExistsError, publish
from enchtable_jax.converters.outputs import check_outputs, shared_staging_folder
from enchtable_jax.distillation.vector import versions, write_vector
from enchtable_jax.training import loop


@dataclasses.dataclass(frozen=True)
class DistillOptions(loop.TrainingOptions):
    """Training settings; the defaults follow the published recipe (1e-5, 4 epochs, 2 x 4, warm-up 10%)."""

    linearized: bool = True  # False: plain fine-tuning of the scope (for comparison)


def distill(model: str | Path, data_path: str | Path, out: str | Path, options: DistillOptions = DistillOptions(),
            resume: bool = False, overwrite: bool = False, export_harmful: str | Path | None = None,
            on_step: Callable[[int, dict[str, float]], None] | None = None,
            progress: bool | None = None, allow_nonfinite: bool = False) -> dict[str, Any]:
    """Distil τ_safe from the aligned model at `model` on harmful `data_path`; write it to `out`.

    Returns the manifest. `on_step(step, metrics)` is called after every optimizer step. `out` and
    `export_harmful` are checked against the inputs before any work (`outputs.check_outputs`); with `overwrite`
    an existing `out` is replaced only at the very end (the new run is staged in a hidden sibling).
    """
    paths = check_outputs({"--out": out, "--export-harmful": export_harmful}, {"--model": model, "--data": data_path},
                          overwrite, exists_ok={"--out"})
    out, export_harmful = paths["--out"], paths.get("--export-harmful")
    work = _work_folder(out, resume, overwrite)
    try:
        manifest = _distill(model, data_path, work, options, resume, overwrite, export_harmful, on_step, progress,
                            allow_nonfinite)
    except BaseException:
        if work != out and jax.process_index() == 0:
            shutil.rmtree(work, ignore_errors=True)
        raise
    if work != out and jax.process_index() == 0:
        publish(work, out, overwrite=True)
    return manifest


def _distill(model: str | Path, data_path: str | Path, work: Path, options: DistillOptions, resume: bool,
             overwrite: bool, export_harmful: Path | None, on_step: Callable[[int, dict[str, float]], None] | None,
             progress: bool | None, allow_nonfinite: bool = False) -> dict[str, Any]:
    """Train in `work` (`out`, or its staging sibling) and write the vector there; returns the manifest."""
    run = loop.train(model, data_path, work / "checkpoints", options, linearized=options.linearized, resume=resume,
                     label="distill", purpose="distillation", on_step=on_step, progress=progress,
                     allow_nonfinite=allow_nonfinite)  # NaN/Inf in the model: refused (or let in, Δ still checked)
    model0, scope, delta = run.model0, run.scope, run.delta
    tau = {n: (-delta[n]).astype(model0.params[n].dtype) for n in scope.params}  # τ_safe = θ0 − θ_harm = −Δ
    manifest = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "base_model": {**run.base, "path": str(model0.source)},
        "scope": {"name": options.scope, "layers": options.layers, "units": len(scope.units),
                  "tensors": list(scope.params), "linearized": options.linearized},
        "data": loop.data_record(data_path, run),
        "training": loop.training_record(options, run),
        "versions": versions(),
    }
    primary = jax.process_index() == 0
    write_vector(work, tau, manifest, primary=primary)
    if primary:
        loop.plot_losses(run.losses, work / "loss.png", f"distillation, scope {scope.name}")
    if export_harmful is not None and primary:
        harm = {**model0.params, **{n: (np.asarray(model0.params[n], np.float32) + delta[n])
                                    .astype(model0.params[n].dtype) for n in scope.params}}
        api.save(api.Model(model0.config, harm, model0.source), export_harmful, overwrite=overwrite)
    return manifest


def _work_folder(out: Path, resume: bool, overwrite: bool) -> Path:
    """Where the run trains and writes: `out` itself (a new output, or `resume`), or, to replace an existing
    `out` with `overwrite`, a hidden staging sibling that is published over it at the end (nothing of the old
    run is deleted before then; an interrupted replacement cannot be resumed and starts again)."""
    if resume:
        if not (out / "checkpoints").is_dir():
            raise FileNotFoundError(f"{out}: nothing to resume (no checkpoints/ folder); run without --resume")
        return out
    if not (out.exists() and any(out.iterdir())):
        return out
    if not overwrite:
        raise OutputExistsError(f"{out} already exists; pass --resume to continue its run, --overwrite to start "
                                "again, or choose another output")
    return shared_staging_folder(out)
