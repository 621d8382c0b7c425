"""Device meshes and shardings: batch over ('data', 'fsdp'), parameters optionally split over 'fsdp'.

One mesh shape serves a laptop, a GPU host and a TPU pod: a 2-D mesh of all devices with a data
axis and an fsdp axis (size 1 when parameters are replicated). Axis types are Auto so that jit's
sharding propagation inserts the gathers and reductions.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from enchtable_jax.errors import EnchtableError
from enchtable_jax.kernels.cpu_threads import training_devices

DATA, FSDP = "data", "fsdp"


def make_mesh(fsdp: int = 1, devices: list | None = None) -> Mesh:
    """A ('data', 'fsdp') mesh over `devices` (default: `cpu_threads.training_devices`, i.e. all but the CPU devices
    added for the merge), with `fsdp` devices per parameter shard group."""
    devices = list(training_devices() if devices is None else devices)
    if fsdp < 1 or len(devices) % fsdp:
        raise EnchtableError(f"fsdp={fsdp} must divide the number of devices ({len(devices)})")
    grid = np.array(devices).reshape(len(devices) // fsdp, fsdp)
    return Mesh(grid, (DATA, FSDP), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def batch_sharding(mesh: Mesh, accumulation_axis: bool = False) -> NamedSharding:
    """Examples split over every device of the mesh (the leading axis, or the second one behind a
    gradient-accumulation axis)."""
    return NamedSharding(mesh, P(None, (DATA, FSDP)) if accumulation_axis else P((DATA, FSDP)))


def param_sharding(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
    """Split the largest axis that the fsdp size divides; replicate when none does (or fsdp is 1)."""
    n = mesh.shape[FSDP]
    spec = [None] * len(shape)
    if n > 1:
        for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
            if shape[axis] % n == 0:
                spec[axis] = FSDP
                break
    return NamedSharding(mesh, P(*spec))


def put(x, sharding: jax.sharding.Sharding) -> jax.Array:
    """Place one array; across processes each one supplies its devices' slices of the same host value."""
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def put_tree(tree, shardings):
    """`put` over matching pytrees of arrays and shardings."""
    return jax.tree.map(put, tree, shardings)


def shard_tree(tree, mesh: Mesh):
    """Place every array of a pytree with `param_sharding` (scalars and small leaves replicated)."""
    return put_tree(tree, tree_shardings(tree, mesh))


def tree_shardings(tree, mesh: Mesh):
    """The `param_sharding` of every leaf, as a pytree (for jit's in/out shardings)."""
    return jax.tree.map(lambda x: param_sharding(mesh, np.shape(x)), tree)


def host_rows(x: jax.Array) -> list[np.ndarray]:
    """The rows (first-axis entries) of an array split over its first axis, on the host: views of each device's
    shard where this process holds them all (no copy on CPU devices: one less stack in memory than gathering),
    else rows of `fully_replicated_numpy`."""
    if not isinstance(x, jax.Array) or not x.is_fully_addressable:
        return list(fully_replicated_numpy(x))
    shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
    rows, seen = [], set()
    for shard in shards:
        start = shard.index[0].start or 0
        if start in seen:  # a replicated copy of rows already taken
            continue
        seen.add(start)
        rows += list(np.asarray(shard.data))
    return rows


def fully_replicated_numpy(x: jax.Array) -> np.ndarray:
    """A host copy of a (possibly multi-process sharded) array."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))
