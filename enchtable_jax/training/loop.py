"""The training loop that `distill` and `finetune` share: records -> batches -> AdamW on a scope, resumable.

Records are rendered with the model folder's chat template (or `template`), with targets on the
response tokens only and truncation to `max_length`; the batch order is a seeded, length-grouped pure
function of (seed, epoch). The trained variable is the displacement Δ = θ − θ0 of the scope's tensors
(float32 master values), updated by AdamW on a warm-up + cosine schedule with clipping and gradient
accumulation, through the linearized or the plain forward, on every device of a ('data', 'fsdp') mesh
(across hosts under `jax.distributed`). An orbax CheckpointManager keeps (Δ, optimizer state, step,
losses) with the base model's and the data's identity and the options, so a killed run resumes to the
bit-identical result and a checkpoint of another run is refused.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from enchtable_jax.converters.hf import is_float
from enchtable_jax.converters.model_io import load
from enchtable_jax.errors import EnchtableError, storage_error
from enchtable_jax.kernels.linearize import zero_delta
from enchtable_jax.kernels.low_rank_delta import LowRank, check_rank, dense_delta, init_factors
from enchtable_jax.kernels.mesh import fully_replicated_numpy, make_mesh, shard_tree
from enchtable_jax.kernels.scopes import SCOPE_HELP, Scope, resolve_scope
from enchtable_jax.kernels.train_step import delta_itself, init_opt_state, make_train_step
from enchtable_jax.models import chat
from enchtable_jax.models.identity import identity
from enchtable_jax.models.model import Model
from enchtable_jax.models.tokenizer import load_tokenizer
from enchtable_jax.nonfinite import check_output
from enchtable_jax.options import COUNT, NON_NEGATIVE, OPTIONAL_COUNT, POSITIVE, SEED, Range, check_fields, option
from enchtable_jax.safe_io import check_tree
from enchtable_jax.training import checkpoint, data


DTYPES = ("float32", "bfloat16", "float16")  # compute dtypes


@dataclasses.dataclass(frozen=True)
class TrainingOptions:
    """Settings of a training run; the defaults follow the published distillation recipe (1e-5, 4 epochs,
    2 x 4, warm-up 10%). `DistillOptions` and `FinetuneOptions` are this with their own defaults. Each field is
    declared with its range and help (options.option); `enchtable distill`/`finetune`/`enchant` make their flags
    from these declarations."""

    scope: str = option("ffn", "; ".join(f"{k}: {v}" for k, v in SCOPE_HELP.items()) + "; combine with '+'")
    layers: str | None = option(None, "layer range as a Python slice, e.g. 12:-12 (default: all)")
    epochs: int = option(4, "passes over the data", COUNT)
    steps: int | None = option(None, "optimizer steps (overrides --epochs)", OPTIONAL_COUNT)
    lr: float = option(1e-5, "peak learning rate of AdamW", POSITIVE)
    batch_size: int = option(2, "examples per micro-batch", COUNT)
    grad_accum: int = option(4, "micro-batches per optimizer step", COUNT)
    warmup_ratio: float = option(0.1, "share of the steps spent warming up the learning rate from 0",
                                 Range(0, 1, high_open=True))
    weight_decay: float = option(0.0, "AdamW weight decay, towards the starting model", NON_NEGATIVE)
    max_grad_norm: float = option(1.0, "clip gradients to this global norm", POSITIVE)
    max_length: int = option(2048, "truncate rendered examples to this many tokens", COUNT)
    seed: int = option(0, "seed of the data order", SEED)
    compute_dtype: str | None = option(None, "forward/backward dtype (master weights stay float32; default: the "
                                             "model's dtype)", choices=DTYPES)
    save_every: int = option(100, "checkpoint every N optimizer steps", COUNT)
    fsdp: int = option(1, "devices per parameter shard group, 1: replicate", COUNT)
    template: str | None = option(None, "chat template if the model has none: chatml, llama3, plain, or a .jinja "
                                        "file")
    group_by_length: bool = option(True, "do not group similar lengths into batches", flag="--no-group-by-length")

    def __post_init__(self):
        check_fields(self)  # the ranges and choices declared above (options.py); the CLI's flags use the same ones


# Options that do not change what a run computes: they may differ between a checkpoint and its resumption.
_FREE_ON_RESUME = ("save_every", "fsdp")


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """A finished run: θ0, the trained Δ = θ − θ0 on the scope (host float32), and what records describe."""

    model0: Model
    base: dict[str, str]  # identity of θ0 (models.identity)
    scope: Scope
    stats: chat.RenderStats
    data_sha256: str
    delta: dict[str, np.ndarray]
    losses: list[float]
    total_steps: int
    devices: int
    tokens_per_second: float | None  # this process's run (a resumed run counts its own steps)


def make_optimizer(options: TrainingOptions, total_steps: int) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW on a linear warm-up + cosine decay schedule."""
    warmup = math.ceil(options.warmup_ratio * total_steps)
    schedule = optax.warmup_cosine_decay_schedule(0.0, options.lr, warmup, max(total_steps, warmup + 1), 0.0)
    return optax.chain(optax.clip_by_global_norm(options.max_grad_norm),
                       optax.adamw(schedule, weight_decay=options.weight_decay))


def check_learning_rate(options: TrainingOptions, total_steps: int) -> None:
    """Refuse a run in which no optimizer step has a non-zero learning rate (the warm-up starts at 0: one step with
    any warm-up is such a run); it would write an all-zero delta, a model or safety vector that does nothing."""
    warmup = math.ceil(options.warmup_ratio * total_steps)
    schedule = optax.warmup_cosine_decay_schedule(0.0, options.lr, warmup, max(total_steps, warmup + 1), 0.0)
    if not any(float(schedule(s)) > 0 for s in range(min(total_steps, warmup + 2))):
        raise EnchtableError(f"no step would have a non-zero learning rate: {total_steps} step(s) with warmup_ratio "
                             f"{options.warmup_ratio} ({warmup} warm-up step(s) from lr 0) learn nothing and would "
                             "write an all-zero result; use more steps (--steps) or --warmup-ratio 0")


def step_micro_batches(step: int, options: TrainingOptions, lengths: list[int]) -> list[list[int]]:
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


def train(model: str | Path, data_path: str | Path, ckpt_dir: Path, options: TrainingOptions, linearized: bool,
          resume: bool = False, label: str = "train", purpose: str = "training",
          on_step: Callable[[int, dict[str, float]], None] | None = None, progress: bool | None = None,
          allow_nonfinite: bool = False, low_rank: LowRank | None = None) -> TrainResult:
    """Train Δ on `options.scope` of the model at `model` on the records in `data_path`, checkpointing to
    `ckpt_dir` (resuming from its newest checkpoint with `resume`). With `low_rank`, each matrix's Δ is trained
    as scale·B·A of that rank (`kernels.low_rank_delta`); the result is Δ, dense, either way.

    `label` names the progress bar, `purpose` the activity that needs the tokenizer (in its error).
    `on_step(step, metrics)` is called after every optimizer step. A model holding NaN or Inf is refused
    (naming the file and tensor) unless `allow_nonfinite`; the trained Δ is checked either way.
    """
    model0 = load(model, progress=progress, allow_nonfinite=allow_nonfinite)
    base = identity(model0.config, model0.params)
    scope = resolve_scope(model0.config, options.scope, options.layers)
    if low_rank is not None:
        check_rank(model0.params, scope, low_rank.rank)
    examples, stats, pad_id = _render_examples(model0.source, data_path, options, purpose)
    total_steps = options.steps or options.epochs * _steps_per_epoch(len(examples), options)
    optimizer = make_optimizer(options, total_steps)
    check_learning_rate(options, total_steps)
    mesh = make_mesh(options.fsdp)
    params0, state = _initial_state(model0.params, scope, optimizer, options.compute_dtype, mesh, low_rank,
                                    options.seed)
    run_key = _run_key(base, data_path, options)
    mngr, start, state, losses = _open_checkpoints(ckpt_dir, resume, state, run_key)
    delta_of = delta_itself if low_rank is None else functools.partial(dense_delta, scale=low_rank.scale)
    step_fn = make_train_step(model0.config, scope, optimizer, linearized=linearized, mesh=mesh, delta_of=delta_of)
    bar = _progress_bar(total_steps, start, f"{label} {scope.name}", progress)
    rows = math.ceil(options.batch_size / mesh.size) * mesh.size  # fixed rows: padding rows carry no targets
    step_batch = functools.partial(_step_batch, examples, [len(e.input_ids) for e in examples], options, pad_id, rows)
    started = time.perf_counter()
    with bar:
        tokens = _run_steps(step_fn, params0, state, step_batch, range(start, total_steps), losses, bar,
                            functools.partial(_save, mngr, options.save_every, total_steps, run_key), on_step)
    mngr.close()
    elapsed = time.perf_counter() - started
    delta = {n: fully_replicated_numpy(v) for n, v in jax.jit(delta_of)(state["delta"]).items()}
    _check_delta(delta, f"{label} of {model0.source}", total_steps, losses)
    return TrainResult(model0=model0, base=base, scope=scope, stats=stats, data_sha256=run_key["data_sha256"],
                       delta=delta, losses=losses, total_steps=total_steps, devices=mesh.size,
                       tokens_per_second=tokens / elapsed if elapsed else None)


def _render_examples(folder: Path | None, data_path: str | Path, options: TrainingOptions,
                     purpose: str) -> tuple[list[chat.Example], chat.RenderStats, int]:
    """The records of `data_path` rendered with the model folder's tokenizer: (examples, counts, pad id); a file
    with no example left after rendering and truncation is refused."""
    tokenizer = _tokenizer(folder, purpose)
    examples, stats = chat.render(data.read_records(data_path), tokenizer, options.max_length, options.template)
    if not examples:
        raise chat.DataError(f"{data_path}: no example has a response token left after rendering and truncation "
                             f"to {options.max_length} tokens")
    # Padding is masked out of attention and loss, so any id serves: the pad token, else (Llama-2/3 ship without
    # one) the eos token, else 0.
    pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if isinstance(i, int)), 0)
    return examples, stats, pad_id


def _steps_per_epoch(examples: int, options: TrainingOptions) -> int:
    """Optimizer steps in one pass over `examples` examples."""
    return math.ceil(math.ceil(examples / options.batch_size) / options.grad_accum)


def _initial_state(params: dict[str, Any], scope: Scope, optimizer: optax.GradientTransformation,
                   compute_dtype: str | None, mesh, low_rank: LowRank | None = None,
                   seed: int = 0) -> tuple[dict[str, jax.Array], dict[str, Any]]:
    """θ0 in the compute dtype and the state {Δ = 0 (float32 master values; with `low_rank`, its factors
    initialised from `seed`), optimizer state}, sharded on `mesh`; the state keeps the key "delta" either way."""
    compute = jnp.dtype(compute_dtype) if compute_dtype else None
    params0 = shard_tree({n: v.astype(compute) if compute and is_float(v.dtype) else v
                          for n, v in params.items()}, mesh)
    delta = shard_tree(zero_delta(params, scope) if low_rank is None  # Δ = θ − θ0, float32 master values
                       else init_factors(params, scope, low_rank.rank, seed), mesh)
    return params0, {"delta": delta, "opt": init_opt_state(optimizer, delta)}


def _run_key(base: dict[str, str], data_path: str | Path, options: TrainingOptions) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the base model, the data, the options that change the result."""
    return {"base_model": base, "data_sha256": data.data_hash(data_path),
            "options": {f.name: getattr(options, f.name) for f in dataclasses.fields(options)
                        if f.name not in _FREE_ON_RESUME}}


def _open_checkpoints(ckpt_dir: Path, resume: bool, state: dict[str, Any],
                      run_key: dict[str, Any]) -> tuple[Any, int, dict[str, Any], list[float]]:
    """The checkpoint manager of `ckpt_dir` and where the run starts: (manager, step, state, losses so far); with
    `resume`, from the newest checkpoint, which must be of this run."""
    if resume and Path(ckpt_dir).is_dir():
        check_tree(ckpt_dir)  # orbax and tensorstore follow symlinks: none may leave the checkpoint folder
    try:  # the manager reads the step folders' metadata: an edited one fails here
        mngr = checkpoint.manager(ckpt_dir)
    except Exception as e:  # noqa: BLE001 - see _damaged
        raise _damaged(ckpt_dir, e) from e
    if resume:
        restored = _restore(mngr, state, ckpt_dir)
        if restored is not None:
            start, state, meta = restored
            check_resume(meta, run_key, ckpt_dir, start)
            return mngr, start, state, meta["losses"]
    return mngr, 0, state, []


def _progress_bar(total_steps: int, start: int, desc: str, progress: bool | None) -> tqdm:
    """The steps' progress bar, shown on process 0 only (`progress` None: when it writes to a terminal)."""
    primary = jax.process_index() == 0
    return tqdm(total=total_steps, initial=start, desc=desc, unit="step",
                disable=None if progress is None and primary else not (progress and primary))


def _step_batch(examples, lengths: list[int], options: TrainingOptions, pad_id: int, rows: int,
                step: int) -> dict[str, np.ndarray]:
    """The stacked micro-batches of optimizer step `step`."""
    return stack_step(examples, step_micro_batches(step, options, lengths), pad_id, rows, options.max_length)


def _run_steps(step_fn, params0, state: dict[str, Any], step_batch: Callable[[int], dict[str, np.ndarray]],
               steps: range, losses: list[float], bar: tqdm, save: Callable[[int, dict[str, Any], list[float]], None],
               on_step: Callable[[int, dict[str, float]], None] | None) -> int:
    """Take the optimizer steps `steps`, updating `state` and `losses` in place, saving and reporting after each;
    returns the number of tokens trained on."""
    tokens = 0
    started = time.perf_counter()
    for step in steps:
        batch = step_batch(step)
        state["delta"], state["opt"], metrics = step_fn(params0, state["delta"], state["opt"], batch)
        loss = float(metrics["loss"])
        losses.append(loss)
        tokens += int(batch["attention_mask"].sum())
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens / (time.perf_counter() - started):,.0f}")
        bar.update()
        save(step + 1, state, losses)
        if on_step is not None:
            on_step(step + 1, {"loss": loss, "grad_norm": float(metrics["grad_norm"])})
    return tokens


def _save(mngr, save_every: int, total_steps: int, run_key: dict[str, Any], step: int, state: dict[str, Any],
          losses: list[float]) -> None:
    """Checkpoint the state after `step` steps every `save_every` steps and after the last."""
    if step % save_every == 0 or step == total_steps:
        checkpoint.save(mngr, step, state, {**run_key, "step": step, "losses": losses})


def _check_delta(delta: dict[str, np.ndarray], what: str, total_steps: int, losses: list[float]) -> None:
    """Refuse a trained Δ that is zero everywhere (nothing learned) or not finite (a diverged run, or a
    non-finite model let in), before anything is written."""
    final = losses[-1] if losses else None
    if not any(np.any(d) for d in delta.values()):  # e.g. every gradient zero: nothing learned, nothing to write
        raise EnchtableError(f"{what}: the trained delta is zero on every tensor after {total_steps} step(s) "
                             f"(final loss {final}); nothing would change: train longer (--steps), with a higher "
                             "--lr or --warmup-ratio 0")
    for n, d in delta.items():
        check_output(d, what, n, f" (final loss {final}; lower --lr or --max-grad-norm?)")


def data_record(data_path: str | Path, result: TrainResult) -> dict[str, Any]:
    """The data a run trained on, as a manifest records it: path, sha256 and the rendering counts."""
    return {"path": str(Path(data_path).resolve()), "sha256": result.data_sha256, **dataclasses.asdict(result.stats)}


def training_record(options: TrainingOptions, result: TrainResult) -> dict[str, Any]:
    """How a run trained, as a manifest records it: every option, steps, devices, the loss curve."""
    losses = result.losses
    return {**dataclasses.asdict(options), "total_steps": result.total_steps, "devices": result.devices,
            "processes": jax.process_count(), "final_loss": losses[-1] if losses else None, "losses": losses,
            "tokens_per_second_this_run": result.tokens_per_second}


def _restore(mngr, like: dict[str, Any], ckpt_dir: Path) -> tuple[int, Any, Any] | None:
    """`checkpoint.restore`, with a damaged checkpoint (truncated or edited files) refused in one line."""
    try:
        return checkpoint.restore(mngr, like)
    except Exception as e:  # noqa: BLE001 - see _damaged
        raise _damaged(ckpt_dir, e) from e


def _damaged(ckpt_dir: Path, e: Exception) -> Exception:
    """The error to raise for `e` from reading the checkpoints: orbax and tensorstore report damage as many types
    (ValueError, KeyError, AttributeError), all one EnchtableError naming the folder; an OSError (permission, disk;
    also tensorstore's ValueError with an errno) stays an OSError naming its file."""
    if isinstance(e, (OSError, EnchtableError)):
        return e
    storage = storage_error(e)
    if isinstance(storage, OSError):
        return storage
    first = " ".join(str(e).split(" See full TensorStore details")[0].split())[:300]
    return EnchtableError(f"{ckpt_dir}: {DAMAGED} ({type(e).__name__}{': ' + first if first else ''})")


DAMAGED = ("the checkpoint cannot be restored: its files were truncated or edited; start afresh without --resume "
           "(with --overwrite), or restore the folder from a copy")


def check_resume(meta: Any, run_key: dict[str, Any], ckpt_dir: Path, step: int | None = None) -> None:
    """Refuse to resume from a damaged checkpoint, or one of another model, other data or other options."""
    fields = {"base_model": dict, "data_sha256": str, "options": dict, "losses": list}
    wrong = [k for k, kind in fields.items() if not isinstance(meta, dict) or not isinstance(meta.get(k), kind)]
    if not wrong and not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in meta["losses"]):
        wrong = ["losses"]
    if not wrong and step is not None and (meta.get("step") != step or len(meta["losses"]) != step):
        wrong = ["step"]
    if wrong:
        raise EnchtableError(f"{ckpt_dir}: {DAMAGED} (metadata field {wrong[0]} is missing or wrong)")
    if meta["base_model"] != run_key["base_model"]:
        raise EnchtableError(f"{ckpt_dir}: the checkpoint was made from another model (weights "
                             f"{str(meta['base_model'].get('weights_blake2b'))[:16]}..., this one "
                             f"{run_key['base_model']['weights_blake2b'][:16]}...); resume with the model it was "
                             "made from")
    if meta["data_sha256"] != run_key["data_sha256"]:
        raise EnchtableError(f"{ckpt_dir}: the training data changed since the checkpoint; resume with the same file")
    changed = {k: (meta["options"].get(k), v) for k, v in run_key["options"].items() if meta["options"].get(k) != v}
    if changed:
        raise EnchtableError(f"{ckpt_dir}: options differ from the checkpointed run: "
                             + ", ".join(f"{k} was {a!r}, now {b!r}" for k, (a, b) in changed.items()))


def _tokenizer(folder: Path | None, purpose: str):
    return load_tokenizer(folder, f"{purpose} renders the data with the model folder's own tokenizer")


def plot_losses(losses: list[float], path: Path | BinaryIO, title: str) -> None:
    """The loss curve per optimizer step, as a PNG (a file, or a binary buffer)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    ax.plot(range(1, len(losses) + 1), losses)
    ax.set(xlabel="optimizer step", ylabel="loss (response tokens)", title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
