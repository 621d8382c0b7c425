"""Safety-vector distillation: NTK-linearized fine-tuning of the aligned model on harmful data.

θ0 = θ_aligned. The scope's tensors θ are trained (float32 master weights, AdamW with warm-up and
cosine decay, gradient clipping and accumulation) through f(θ0) + J(θ0)(θ − θ0); the result is
τ_safe = θ0 − θ_harm on the scope. Runs on every device of a ('data', 'fsdp') mesh, across hosts
when `jax.distributed` is initialised, and resumes exactly from orbax checkpoints.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from enchtable_jax import api
from enchtable_jax.converters.atomic import OutputExistsError
from enchtable_jax.converters.hf import is_float
from enchtable_jax.distillation import checkpoint, data
from enchtable_jax.distillation.vector import MANIFEST, fully_replicated_numpy, versions, write_vector
from enchtable_jax.kernels.linearize import zero_delta
from enchtable_jax.kernels.mesh import make_mesh, shard_tree
from enchtable_jax.kernels.scopes import resolve_scope
from enchtable_jax.kernels.train_step import init_opt_state, make_train_step
from enchtable_jax.models.identity import identity


@dataclasses.dataclass(frozen=True)
class DistillOptions:
    """Training settings; the defaults follow the published recipe (1e-5, 4 epochs, 2 x 4, warm-up 10%)."""

    scope: str = "ffn"
    layers: str | None = None
    epochs: int = 4
    steps: int | None = None  # optimizer steps; overrides epochs
    lr: float = 1e-5
    batch_size: int = 2  # examples per micro-batch
    grad_accum: int = 4  # micro-batches per optimizer step
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = 2048
    seed: int = 0
    compute_dtype: str | None = None  # 'bfloat16' / 'float32'; default: the model's stored dtype
    save_every: int = 100  # checkpoint every N optimizer steps
    fsdp: int = 1  # devices per parameter shard group
    template: str | None = None  # chat template override: a name or a .jinja file
    group_by_length: bool = True
    linearized: bool = True  # False: plain fine-tuning of the scope (for comparison)

    def __post_init__(self):
        for name in ("epochs", "lr", "batch_size", "grad_accum", "max_length", "save_every", "fsdp"):
            if not getattr(self, name) > 0:
                raise ValueError(f"option {name} must be positive, got {getattr(self, name)!r}")
        if self.steps is not None and self.steps <= 0:
            raise ValueError(f"option steps must be positive, got {self.steps!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"option warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if self.compute_dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(f"option compute_dtype must be float32, bfloat16 or float16, got {self.compute_dtype!r}")


# Options whose change makes a checkpoint's state meaningless for the resumed run.
_RESUME_KEYS = ("scope", "layers", "epochs", "steps", "lr", "batch_size", "grad_accum", "warmup_ratio", "weight_decay",
                "max_grad_norm", "max_length", "seed", "compute_dtype", "template", "group_by_length", "linearized")


def make_optimizer(options: DistillOptions, total_steps: int) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW on a linear warm-up + cosine decay schedule."""
    warmup = math.ceil(options.warmup_ratio * total_steps)
    schedule = optax.warmup_cosine_decay_schedule(0.0, options.lr, warmup, max(total_steps, warmup + 1), 0.0)
    return optax.chain(optax.clip_by_global_norm(options.max_grad_norm),
                       optax.adamw(schedule, weight_decay=options.weight_decay))


def step_micro_batches(step: int, options: DistillOptions, lengths: list[int]) -> list[list[int]]:
    """Example indices of each micro-batch of optimizer step `step` (epochs cycle as needed)."""
    per_epoch = math.ceil(len(lengths) / options.batch_size)
    out = []
    for k in range(step * options.grad_accum, (step + 1) * options.grad_accum):
        epoch, j = divmod(k, per_epoch)
        out.append(data.epoch_batches(lengths, options.batch_size, options.seed, epoch, options.group_by_length)[j])
    return out


def stack_step(examples, micro: list[list[int]], pad_id: int, rows: int, max_length: int) -> dict[str, np.ndarray]:
    """[A, rows, T] arrays for one optimizer step: every micro-batch padded to the step's longest."""
    parts = [data.collate(examples, idx, pad_id, rows=rows, max_length=max_length) for idx in micro]
    t = max(p["input_ids"].shape[1] for p in parts)
    return {k: np.stack([np.pad(p[k], ((0, 0), (0, t - p[k].shape[1]))) for p in parts]) for k in parts[0]}


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
    model0 = api.load(model, progress=progress)
    base = identity(model0.config, model0.params)
    scope = resolve_scope(model0.config, options.scope, options.layers)
    tokenizer = _tokenizer(model0.source)
    conversations = data.read_records(data_path)
    examples, stats = data.render(conversations, tokenizer, options.max_length, options.template)
    if not examples:
        raise data.DataError(f"{data_path}: no example has a response token left after rendering and truncation "
                             f"to {options.max_length} tokens")
    lengths = [len(e.input_ids) for e in examples]
    per_epoch = math.ceil(math.ceil(len(examples) / options.batch_size) / options.grad_accum)
    total_steps = options.steps or options.epochs * per_epoch
    optimizer = make_optimizer(options, total_steps)

    mesh = make_mesh(options.fsdp)
    rows = math.ceil(options.batch_size / mesh.size) * mesh.size  # fixed rows: padding rows carry no targets
    compute = jnp.dtype(options.compute_dtype) if options.compute_dtype else None
    params0 = shard_tree({n: v.astype(compute) if compute and is_float(v.dtype) else v
                          for n, v in model0.params.items()}, mesh)
    delta = shard_tree(zero_delta(model0.params, scope), mesh)  # Δ = θ − θ0, float32 master values
    state = {"delta": delta, "opt": init_opt_state(optimizer, delta)}
    run_key = {"base_model": base, "data_sha256": data.data_hash(data_path),
               "options": {k: getattr(options, k) for k in _RESUME_KEYS}}
    mngr = checkpoint.manager(ckpt_dir)
    start, losses = 0, []
    if resume:
        restored = checkpoint.restore(mngr, state)
        if restored is not None:
            start, state, meta = restored
            _check_resume(meta, run_key, ckpt_dir)
            losses = meta["losses"]
    step_fn = make_train_step(model0.config, scope, optimizer, linearized=options.linearized, mesh=mesh)
    primary = jax.process_index() == 0
    bar = tqdm(total=total_steps, initial=start, desc=f"distill {scope.name}", unit="step",
               disable=None if progress is None and primary else not (progress and primary))
    tokens = 0
    started = time.perf_counter()
    with bar:
        for step in range(start, total_steps):
            batch = stack_step(examples, step_micro_batches(step, options, lengths), tokenizer.pad_token_id, rows,
                               options.max_length)
            state["delta"], state["opt"], metrics = step_fn(params0, state["delta"], state["opt"], batch)
            loss = float(metrics["loss"])
            losses.append(loss)
            tokens += int(batch["attention_mask"].sum())
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens / (time.perf_counter() - started):,.0f}")
            bar.update()
            if (step + 1) % options.save_every == 0 or step + 1 == total_steps:
                checkpoint.save(mngr, step + 1, state, {**run_key, "step": step + 1, "losses": losses})
            if on_step is not None:
                on_step(step + 1, {"loss": loss, "grad_norm": float(metrics["grad_norm"])})
    mngr.close()
    elapsed = time.perf_counter() - started
    delta = {n: fully_replicated_numpy(v) for n, v in state["delta"].items()}
    tau = {n: (-delta[n]).astype(model0.params[n].dtype) for n in scope.params}  # τ_safe = θ0 − θ_harm = −Δ
    manifest = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "base_model": {**base, "path": str(model0.source)},
        "scope": {"name": options.scope, "layers": options.layers, "units": len(scope.units),
                  "tensors": list(scope.params), "linearized": options.linearized},
        "data": {"path": str(Path(data_path).resolve()), "sha256": run_key["data_sha256"],
                 **dataclasses.asdict(stats)},
        "training": {**dataclasses.asdict(options), "total_steps": total_steps, "devices": mesh.size,
                     "processes": jax.process_count(), "final_loss": losses[-1] if losses else None,
                     "losses": losses, "tokens_per_second_this_run": tokens / elapsed if elapsed else None},
        "versions": versions(),
    }
    write_vector(out, tau, manifest, primary=primary)
    if primary:
        _plot_losses(losses, out / "loss.png", scope.name)
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


def _check_resume(meta: dict[str, Any], run_key: dict[str, Any], ckpt_dir: Path) -> None:
    if meta["base_model"] != run_key["base_model"]:
        raise ValueError(f"{ckpt_dir}: the checkpoint was made from another model (weights "
                         f"{meta['base_model']['weights_blake2b'][:16]}..., this one "
                         f"{run_key['base_model']['weights_blake2b'][:16]}...); resume with the model it was made from")
    if meta["data_sha256"] != run_key["data_sha256"]:
        raise ValueError(f"{ckpt_dir}: the training data changed since the checkpoint; resume with the same file")
    changed = {k: (meta["options"].get(k), v) for k, v in run_key["options"].items() if meta["options"].get(k) != v}
    if changed:
        raise ValueError(f"{ckpt_dir}: options differ from the checkpointed run: "
                         + ", ".join(f"{k} was {a!r}, now {b!r}" for k, (a, b) in changed.items()))


def _tokenizer(folder: Path | None):
    from enchtable_jax.models.tokenizer import load_tokenizer

    return load_tokenizer(folder, "distillation renders the data with the model folder's own tokenizer")


def _plot_losses(losses: list[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses)
    ax.set(xlabel="optimizer step", ylabel="loss (response tokens)", title=f"distillation, scope {title}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
