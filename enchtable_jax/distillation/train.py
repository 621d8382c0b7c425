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
from enchtable_jax.converters.atomic import OutputExistsError
from enchtable_jax.distillation.vector import MANIFEST, versions, write_vector
from enchtable_jax.training import loop


@dataclasses.dataclass(frozen=True)
class DistillOptions(loop.TrainingOptions):
    """Training settings; the defaults follow the published recipe (1e-5, 4 epochs, 2 x 4, warm-up 10%)."""

    linearized: bool = True  # False: plain fine-tuning of the scope (for comparison)


def distill(model: str | Path, data_path: str | Path, out: str | Path, options: DistillOptions = DistillOptions(),
            resume: bool = False, overwrite: bool = False, export_harmful: str | Path | None = None,
            on_step: Callable[[int, dict[str, float]], None] | None = None,
            progress: bool | None = None) -> dict[str, Any]:
    """Distil τ_safe from the aligned model at `model` on harmful `data_path`; write it to `out`.

    Returns the manifest. `on_step(step, metrics)` is called after every optimizer step.
    """
    out = Path(out).expanduser().resolve()
    ckpt_dir = out / "checkpoints"
    _check_output(out, ckpt_dir, resume, overwrite)
    run = loop.train(model, data_path, ckpt_dir, options, linearized=options.linearized, resume=resume,
                     label="distill", purpose="distillation", on_step=on_step, progress=progress)
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
    write_vector(out, tau, manifest, primary=primary)
    if primary:
        loop.plot_losses(run.losses, out / "loss.png", f"distillation, scope {scope.name}")
    if export_harmful is not None and primary:
        harm = {**model0.params, **{n: (np.asarray(model0.params[n], np.float32) + delta[n])
                                    .astype(model0.params[n].dtype) for n in scope.params}}
        api.save(api.Model(model0.config, harm, model0.source), export_harmful, overwrite=overwrite)
    return manifest


def _check_output(out: Path, ckpt_dir: Path, resume: bool, overwrite: bool) -> None:
    if resume:
        if not ckpt_dir.is_dir():
            raise FileNotFoundError(f"{out}: nothing to resume (no checkpoints/ folder); run without --resume")
        return
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise OutputExistsError(f"{out} already exists; pass --resume to continue its run, --overwrite to start "
                                    "again, or choose another output")
        if jax.process_index() == 0:
            for child in (ckpt_dir, out / "safety_vector"):
                shutil.rmtree(child, ignore_errors=True)
            for name in (MANIFEST, "safety_vector.safetensors", "loss.png"):
                (out / name).unlink(missing_ok=True)
