"""Safety-vector distillation: NTK-linearized fine-tuning of the aligned model on harmful data.

θ0 = θ_aligned. The scope's tensors θ are trained (float32 master weights, AdamW with warm-up and
cosine decay, gradient clipping and accumulation) through f(θ0) + J(θ0)(θ − θ0); the result is
τ_safe = θ0 − θ_harm on the scope. With `lora_rank` r each matrix's θ − θ0 is trained as (α/r)·B·A
(`kernels.low_rank_delta`), so τ_safe, still written dense, has rank ≤ r per matrix. Runs on every
device of a ('data', 'fsdp') mesh, across hosts when `jax.distributed` is initialised, and resumes exactly
from orbax checkpoints: the loop is `training.loop.train`, which `finetune` shares.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from enchtable_jax.converters.atomic import OutputExistsError, publish
from enchtable_jax.converters.model_io import save
from enchtable_jax.converters.outputs import check_outputs, template_input
from enchtable_jax.converters.safety_vector import write_vector
from enchtable_jax.kernels.low_rank_delta import VECTORS, LowRank
from enchtable_jax.models.identity import versions
from enchtable_jax.models.model import Model
from enchtable_jax.options import OPTIONAL_COUNT, POSITIVE, option
from enchtable_jax.training import loop


@dataclasses.dataclass(frozen=True)
class DistillOptions(loop.TrainingOptions):
    """Training settings; the defaults follow the published recipe (1e-5, 4 epochs, 2 x 4, warm-up 10%)."""

    linearized: bool = option(True, "ordinary fine-tuning of the scope instead of linearized", flag="--plain")
    lora_rank: int | None = option(None, "train each matrix of the scope as a rank-r LoRA update scale*B*A (PEFT's "
                                         f"init; the scope's vectors train in {VECTORS}); the vector written is "
                                         "still dense, of rank <= r per matrix (default: full rank)", OPTIONAL_COUNT)
    lora_alpha: float = option(8.0, "LoRA alpha with --lora-rank: scale = alpha / r (PEFT's default alpha)", POSITIVE)

    def low_rank(self) -> LowRank | None:
        """The factorisation `--lora-rank` asks for, if any."""
        return None if self.lora_rank is None else LowRank(self.lora_rank, self.lora_alpha)


def distill(model: str | Path, data_path: str | Path, out: str | Path, options: DistillOptions = DistillOptions(),
            resume: bool = False, overwrite: bool = False, export_harmful: str | Path | None = None,
            on_step: Callable[[int, dict[str, float]], None] | None = None,
            progress: bool | None = None, allow_nonfinite: bool = False) -> dict[str, Any]:
    """Distil τ_safe from the aligned model at `model` on harmful `data_path`; write it to `out`.

    Returns the manifest. `on_step(step, metrics)` is called after every optimizer step. `out` and
    `export_harmful` are checked against the inputs before any work (`outputs.check_outputs`); with `overwrite`
    an existing `out` is replaced only at the very end (the new run is staged in a hidden sibling).
    """
    paths = check_outputs({"--out": out, "--export-harmful": export_harmful},
                          {"--model": model, "--data": data_path, "--template": template_input(options.template)},
                          overwrite, exists_ok={"--out"})
    out, export_harmful = paths["--out"], paths.get("--export-harmful")
    work, created, replace = _work_folder(out, resume, overwrite)
    primary = jax.process_index() == 0
    try:
        manifest = _distill(model, data_path, work, options, resume, overwrite, export_harmful, on_step, progress,
                            allow_nonfinite)
    except Exception:
        if created and primary:  # a failed run leaves nothing (an interrupted one, e.g. Ctrl-C, stays resumable)
            shutil.rmtree(work, ignore_errors=True)
        raise
    if work != out and primary:
        _publish(work, out, replace)
    return manifest


def partial_folder(out: str | Path) -> Path:
    """The hidden sibling `.NAME.partial` of `out` in which a distillation trains (with its checkpoints) until
    it is published at `out`; a killed run leaves it there for `--resume`."""
    out = Path(out).expanduser().resolve()
    return out.with_name(f".{out.name}.partial")


def resumable(out: str | Path) -> bool:
    """Whether `distill(..., resume=True)` finds a run to continue for `out`."""
    out = Path(out).expanduser().resolve()
    return (partial_folder(out) / "checkpoints").is_dir() or (out / "checkpoints").is_dir()


_OWNER = ".owner-pid"


def _owner_alive(partial: Path) -> int | None:
    """The id of the live process (not this one) that trains in `partial`, if any."""
    try:
        pid = int((partial / _OWNER).read_text().strip())
    except (OSError, ValueError):
        return None
    if pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except OSError:
        return pid
    return pid


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _nonempty(path: Path) -> bool:
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def _work_folder(out: Path, resume: bool, overwrite: bool) -> tuple[Path, bool, bool]:
    """(where the run trains and writes, whether this run created it, whether publishing replaces `out`).

    A run trains in the hidden sibling `partial_folder(out)`, which it creates itself (never a folder someone
    else made), and publishes it at `out` at the very end with `atomic.publish`: a folder that appeared at
    `out` meanwhile is never replaced without `overwrite`. `resume` continues the run in that sibling (also
    one killed while replacing an existing `out` with `overwrite`: pass both again to replace it), or in
    `out/checkpoints` of a finished run."""
    partial = partial_folder(out)
    if resume:
        if (partial / "checkpoints").is_dir():
            owner = _owner_alive(partial)
            if owner is not None:
                raise OutputExistsError(f"{out}: process {owner} is still training in {partial}")
            if _nonempty(out) and not overwrite:
                raise OutputExistsError(f"{out} already exists and the interrupted run in {partial} would replace "
                                        "it; pass --overwrite with --resume to replace it, or move it away")
            return partial, False, overwrite
        if (out / "checkpoints").is_dir():
            return out, False, False
        raise FileNotFoundError(f"{out}: nothing to resume (no checkpoints/ in {partial} or {out}); run without "
                                "--resume")
    if os.path.lexists(partial):
        owner = _owner_alive(partial)
        if owner is not None:
            raise OutputExistsError(f"{out}: process {owner} is training in {partial}; wait for it or choose "
                                    "another output")
        if not overwrite:
            raise OutputExistsError(f"{out}: an interrupted run is in {partial}; pass --resume to continue it, "
                                    "--overwrite to start again, or choose another output")
    if _nonempty(out) and not overwrite:
        raise OutputExistsError(f"{out} already exists; pass --resume to continue its run, --overwrite to start "
                                "again, or choose another output")
    _sync("enchtable-distill-checked")
    if jax.process_index() == 0:
        if os.path.lexists(partial):
            shutil.rmtree(partial) if partial.is_dir() and not partial.is_symlink() else partial.unlink()
        partial.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(partial)
        except FileExistsError:
            raise OutputExistsError(f"{out}: another run started training in {partial}") from None
        (partial / _OWNER).write_text(f"{os.getpid()}\n")
    _sync("enchtable-distill-created")
    return partial, True, overwrite


def _publish(work: Path, out: Path, replace: bool) -> None:
    """Publish the finished run `work` at `out` (an empty folder there is taken; any other is kept unless
    `replace`); when `out` appeared meanwhile, the run is kept in `work` for `--resume`."""
    (work / _OWNER).unlink(missing_ok=True)
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        try:
            os.rmdir(out)
        except OSError:
            pass
    try:
        publish(work, out, overwrite=replace)
    except OutputExistsError:
        raise OutputExistsError(f"{out} appeared while this run trained and was left as it is; the finished run "
                                f"is kept in {work}: move {out} away and rerun with --resume to publish it (or "
                                "--resume --overwrite to replace it)") from None


def _distill(model: str | Path, data_path: str | Path, work: Path, options: DistillOptions, resume: bool,
             overwrite: bool, export_harmful: Path | None, on_step: Callable[[int, dict[str, float]], None] | None,
             progress: bool | None, allow_nonfinite: bool = False) -> dict[str, Any]:
    """Train in `work` (`out`, or its staging sibling) and write the vector there; returns the manifest."""
    run = loop.train(model, data_path, work / "checkpoints", options, linearized=options.linearized, resume=resume,
                     label="distill", purpose="distillation", on_step=on_step, progress=progress,
                     allow_nonfinite=allow_nonfinite,  # NaN/Inf in the model: refused (or let in, Δ still checked)
                     low_rank=options.low_rank())
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
        save(Model(model0.config, harm, model0.source), export_harmful, overwrite=overwrite)
    return manifest
