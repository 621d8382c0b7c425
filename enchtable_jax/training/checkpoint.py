"""Resumable training state: orbax CheckpointManager of (θ on the scope, optimizer state) plus JSON
metadata (step, losses, seed, data order check, base-model and data identity)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


def manager(folder: Path, keep: int = 2) -> ocp.CheckpointManager:
    """A manager over `folder` (absolute) keeping the newest `keep` steps."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
    return ocp.CheckpointManager(folder.resolve(), options=options, item_names=("state", "meta"))


def save(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict[str, Any]) -> None:
    """Save the state at `step` (synchronously, so a kill right after leaves a complete checkpoint)."""
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
    mngr.wait_until_finished()


def restore(mngr: ocp.CheckpointManager, like: Any) -> tuple[int, Any, dict[str, Any]] | None:
    """(step, state, meta) of the newest checkpoint, restored with the shapes/dtypes/shardings of `like`."""
    step = mngr.latest_step()
    if step is None:
        return None
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                          meta=ocp.args.JsonRestore()))
    return step, restored["state"], restored["meta"]
