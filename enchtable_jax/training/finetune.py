"""Plain supervised fine-tuning of a model folder on alpaca/chat records, into a new HF folder: the task
models and harmful surrogates that EnchTable's pipeline takes as inputs.

The loop is `distill`'s (training/loop.py: same rendering, batches, optimizer, mesh and resume) with the
plain forward, by default on every tensor (scope `all`: embeddings, decoder layers, final norm, head).
The output is θ0 + Δ in the model's stored dtype, written atomically with the source's tokenizer files,
`finetune.json` (options, data digest, losses, versions, base identity) and `loss.png`; tensors outside
the scope are the source's bytes. Training state lives in OUT-checkpoints/ beside the output until the
folder is written, so a killed run continues with `resume=True` to the bit-identical result.
"""

from __future__ import annotations

import dataclasses
import datetime
import io
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from enchtable_jax.converters.atomic import OutputExistsError
from enchtable_jax.converters.outputs import check_outputs, shared_staging_folder, template_input
from enchtable_jax.converters.hf import DEFAULT_SHARD_SIZE, write_hf
from enchtable_jax.models.identity import versions
from enchtable_jax.models.tensors import OPTIONAL_TIED_HEAD
from enchtable_jax.options import with_default
from enchtable_jax.training import loop

RECORD = "finetune.json"
FORMAT = "enchtable-finetune"
VERSION = 1


@dataclasses.dataclass(frozen=True)
class FinetuneOptions(loop.TrainingOptions):
    """Training settings of `finetune`: those of `distill` (less `linearized`), on every tensor by default."""

    scope: str = with_default(loop.TrainingOptions, "scope", "all")


def checkpoint_dir(out: str | Path) -> Path:
    """Where a fine-tuning run into `out` keeps its resumable state: OUT-checkpoints beside it."""
    out = Path(out).expanduser().resolve()
    return out.with_name(out.name + "-checkpoints")


def finetune(model: str | Path, data_path: str | Path, out: str | Path, options: FinetuneOptions = FinetuneOptions(),
             resume: bool = False, overwrite: bool = False, shard_size: int | str = DEFAULT_SHARD_SIZE,
             on_step: Callable[[int, dict[str, float]], None] | None = None,
             progress: bool | None = None, allow_nonfinite: bool = False) -> dict[str, Any]:
    """Fine-tune the model at `model` (HF folder or orbax checkpoint, with tokenizer) on `data_path` and write
    the result to the HF folder `out`; returns its record (what `out/finetune.json` holds).

    `resume` continues a killed run from OUT-checkpoints/ (deleted once `out` is written); an existing `out`
    or unfinished checkpoints are refused unless `overwrite`, and both are checked against the inputs before any
    work; nothing is deleted before the end (the checkpoints of a run started afresh over an unfinished one go to
    a hidden sibling). `on_step(step, metrics)` is called after every optimizer step.
    """
    paths = check_outputs({"--out": out, "OUT-checkpoints": checkpoint_dir(out)},
                          {"--model": model, "--data": data_path, "--template": template_input(options.template)},
                          overwrite, exists_ok={"OUT-checkpoints"})
    out, ckpt_dir = paths["--out"], paths["OUT-checkpoints"]
    work = _checkpoint_folder(ckpt_dir, resume, overwrite)
    try:
        run = loop.train(model, data_path, work, options, linearized=False, resume=resume, label="finetune",
                         purpose="fine-tuning", on_step=on_step, progress=progress,
                         allow_nonfinite=allow_nonfinite)  # NaN/Inf in the model: refused (or let in, Δ checked)
    except BaseException:
        if work != ckpt_dir and jax.process_index() == 0:
            shutil.rmtree(work, ignore_errors=True)
        raise
    model0 = run.model0
    params = {**model0.params, **{n: (np.asarray(model0.params[n], np.float32) + d).astype(model0.params[n].dtype)
                                  for n, d in run.delta.items()}}
    embed = "model.embed_tokens.weight"
    if model0.config.tie_word_embeddings and OPTIONAL_TIED_HEAD in params and embed in run.delta:
        params[OPTIONAL_TIED_HEAD] = params[embed]  # a stored copy of a tied head follows the trained embedding
    record = {
        "format": FORMAT,
        "version": VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "base_model": {**run.base, "path": str(model0.source)},
        "scope": {"name": options.scope, "layers": options.layers, "tensors": list(run.scope.params)},
        "data": loop.data_record(data_path, run),
        "training": loop.training_record(options, run),
        "versions": versions(),
    }
    if jax.process_index() == 0:
        loss_png = io.BytesIO()
        loop.plot_losses(run.losses, loss_png, f"fine-tuning, scope {run.scope.name}")
        files = {RECORD: json.dumps(record, indent=2, default=str) + "\n", "loss.png": loss_png.getvalue()}
        # written into the staging folder: the output appears complete or not at all
        write_hf(out, model0.config, params, like=model0.source, shard_size=shard_size, overwrite=overwrite,
                 progress=progress, extra_files=files)
        for folder in {work, ckpt_dir}:
            shutil.rmtree(folder, ignore_errors=True)
    return record


def is_checkpoint_folder(folder: Path) -> bool:
    """Whether `folder` looks like an orbax CheckpointManager folder this tool wrote: only numbered step folders
    (and orbax's temporary `STEP.orbax-checkpoint-tmp-*` ones), or nothing."""
    if not folder.is_dir() or folder.is_symlink():
        return False
    return all(re.fullmatch(r"\d+(\.orbax-checkpoint-tmp.*)?", entry.name) and entry.is_dir()
               and not entry.is_symlink() for entry in folder.iterdir())


def _checkpoint_folder(ckpt_dir: Path, resume: bool, overwrite: bool) -> Path:
    """Where the run checkpoints: `ckpt_dir`, or, when it holds an unfinished run's checkpoints and `overwrite`
    starts afresh, a hidden sibling (the old checkpoints are deleted only once the output is written). Refuses
    to resume without checkpoints, or to start afresh over them without `overwrite`."""
    if resume:
        if not ckpt_dir.is_dir():
            raise FileNotFoundError(f"nothing to resume: no checkpoints in {ckpt_dir}; run without --resume")
        return ckpt_dir
    if not ckpt_dir.exists():
        return ckpt_dir
    if not is_checkpoint_folder(ckpt_dir):
        raise OutputExistsError(f"{ckpt_dir} exists and is not a checkpoint folder of this tool (it holds more "
                                "than numbered orbax steps); move it away or choose another --out")
    if not overwrite:
        raise OutputExistsError(f"{ckpt_dir} holds the checkpoints of an unfinished run; pass --resume to "
                                "continue it, --overwrite to start again")
    return shared_staging_folder(ckpt_dir)
