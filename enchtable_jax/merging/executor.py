"""The merge, streamed in two passes and spread over every device.

Pass 1 reads the tensors one at a time in name order: checks shapes, decides per tensor whether it
is merged or copied from the task model (and why), digests the base weights (when a safety vector's
manifest names its base model) and accumulates the global norms that set an adaptive α. Pass 2 stacks the
merged tensors' τ_task = task − base and τ_safe by (shape, dtype) into groups no larger than
`group_bytes`, maps the method over each group with `jax.shard_map` (the group split over a 1-D mesh
of all devices, every device running one tensor at a time with `lax.map`, so results do not depend
on the device count; the deltas overwrite the donated τ_task stack), adds each delta to its base
tensor on the host (re-read, one tensor at a time) and yields the results as `MergedTensor` records (name,
array, the method's statistics). Two stacks
per group, not four (base, task, safety, merged): peak memory stays near two groups in flight.
Copied tensors keep their bytes.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import math
import queue
import zlib
from collections.abc import Callable, Generator, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from enchtable_jax.converters.safetensors_format import TensorSink, aligned_empty
from enchtable_jax.errors import EnchtableError
from enchtable_jax.kernels import cpu_threads
from enchtable_jax.kernels.cpu_threads import blas_threads, warn_if_one_core_used
from enchtable_jax.kernels.factored import factored_sq_norm, factored_triplets
from enchtable_jax.kernels.mesh import fully_replicated_numpy, host_rows, put
from enchtable_jax.kernels.spectral import EXACT_SOLVERS, solver_for, top_triplets
from enchtable_jax.merging import base_digest, decomposition
from enchtable_jax.merging.lora import LoraTask
from enchtable_jax.merging.methods import DEFAULT_BETA, METHODS, HostForm, method_options
from enchtable_jax.merging.sources import SafetyDelta, TensorSource
from enchtable_jax.models.identity import WeightsDigest, check_base, config_digest
from enchtable_jax.nonfinite import check_output, host_finite, input_error, output_error

_ARCHITECTURE_FIELDS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                        "num_key_value_heads", "head_dim")
DEFAULT_GROUP_BYTES = 512 * 2**20
_HOST_CHUNK = 1 << 16  # entries per step of a host-form merge: 256 KiB of float32 per buffer, cache-sized
GROUP_AXIS = "groups"
Sinks = Callable[[str], TensorSink]  # the output's sink for a tensor (`run`)


@dataclasses.dataclass(frozen=True)
class TensorPlan:
    """What happens to one tensor of the task model."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    merge: bool
    reason: str | None = None  # why it is copied unchanged
    rank: int | None = None  # τ_task's rank when the task model gives it as factors (a LoRA adapter)


@dataclasses.dataclass(frozen=True)
class MergedTensor:
    """One tensor of the merged model as pass 2 yields it: name, host array in the task model's dtype (finite; None
    when it was written to its sink), and the method's statistics for a merged tensor (empty for one copied from
    the task model)."""

    name: str
    array: np.ndarray | None
    stats: Mapping[str, float]


@dataclasses.dataclass(frozen=True)
class MergePlan:
    """Outcome of pass 1."""

    tensors: dict[str, TensorPlan]
    alpha: float
    norms: dict[str, float] | None  # ‖τ_task‖ and ‖τ_safe‖ over the merged tensors, when α is adaptive

    def matrices(self) -> dict[str, tuple[int, ...]]:
        """{name: shape} of the merged matrices: the tensors whose triplets a decomposing method uses."""
        return {n: t.shape for n, t in self.tensors.items() if t.merge and len(t.shape) == 2}

    def groups(self, group_bytes: int, devices: int) -> list[list[str]]:
        """Merged tensors grouped by (shape, dtype, factor rank), each group cut to at most `group_bytes` of
        float32."""
        by_kind: dict[tuple, list[str]] = {}
        for t in self.tensors.values():
            if t.merge:
                by_kind.setdefault((t.shape, t.dtype.str, t.rank), []).append(t.name)
        groups = []
        for (shape, _, _), names in by_kind.items():
            per = max(1, group_bytes // (4 * math.prod(shape) or 1))
            per = max(devices, per - per % devices)  # whole rounds over the devices
            groups += [names[i:i + per] for i in range(0, len(names), per)]
        return groups


def check_architecture(base: TensorSource, task: TensorSource) -> None:
    """Refuse models of different architecture, naming the differing config field."""
    if base.config is None or task.config is None:
        return
    for field in _ARCHITECTURE_FIELDS:
        a, b = getattr(base.config, field), getattr(task.config, field)
        if a != b:
            raise EnchtableError(f"base and task models differ in architecture: {field} is {a!r} in {base.folder} and "
                                 f"{b!r} in {task.folder}; merging needs the task model fine-tuned from the base")


def plan(base: TensorSource, task: TensorSource, safety: SafetyDelta, method: str, alpha: float | None,
         beta: float | None, progress: bool | None = None, allow_nonfinite: bool = False) -> MergePlan:
    """Pass 1: per-tensor decisions, the base-model check and the scale α.

    A NaN or Inf met on the way (in the norms of an adaptive α) is refused naming its file and tensor; with
    `allow_nonfinite` the norms are taken over the finite entries instead, so one bad entry cannot make α NaN.
    """
    check_architecture(base, task)
    missing = sorted(set(task.specs) - set(base.specs))
    if missing:
        raise EnchtableError(f"tensor(s) {', '.join(missing[:5])} of the task model are missing from the base model "
                             f"{base.folder}; are they the same architecture?")
    safety_names = safety.names()
    adaptive = alpha is None and (beta is not None or METHODS[method].adaptive_alpha)
    check = safety.manifest is not None and base.config is not None  # a safety vector names its base model
    tensors, sums, digest, nonfinite_base = _pass_one(base, task, safety, safety_names, adaptive, check, progress,
                                                      allow_nonfinite)
    if nonfinite_base and not allow_nonfinite:  # before the identity check, which it would fail less clearly
        name = nonfinite_base[0]
        raise input_error(base.where(name), name, base.read(name))
    if check:
        identity = {"model_type": base.config.model_type, "config_sha256": config_digest(base.config),
                    "weights_blake2b": digest}
        check_base(safety.manifest, identity, f"{safety.what} with base {base.folder}")
    safety.check_tensors(base, task, sum(t.merge for t in tensors.values()))
    if not adaptive:
        return MergePlan(tensors, 1.0 if alpha is None else float(alpha), None)
    norms = {k: math.sqrt(v) for k, v in sums.items()}
    beta = DEFAULT_BETA if beta is None else beta
    return MergePlan(tensors, float(beta * norms["task"] / norms["safety"] if norms["safety"] > 0 else 0.0), norms)


def _pass_one(base: TensorSource, task: TensorSource, safety: SafetyDelta, safety_names: set[str], adaptive: bool,
              check: bool, progress: bool | None, allow_nonfinite: bool
              ) -> tuple[dict[str, TensorPlan], dict[str, float], str | None, list[str]]:
    """Go through the base tensors in name order, reading them only for the digest or α's norms: (each task tensor's
    plan, the sums of squares of τ_task and τ_safe over the merged tensors when α is `adaptive`, the hex digest of
    the base weights when `check`, the task tensors whose base is not finite, found when `check`)."""
    digest = WeightsDigest()
    sums = {"task": 0.0, "safety": 0.0}
    tensors: dict[str, TensorPlan] = {}
    # The digest (a check of the safety vector's base) hashes every base tensor, unless this machine remembers it
    # for these very files (`base_digest`); hashlib releases the GIL, so it runs on a worker thread, one tensor
    # behind the reads, in name order.
    known, files = base_digest.recall(base) if check else (None, None)
    hashing_all = check and known is None
    nonfinite_base: list[str] = [] if known is None else list(known.nonfinite)

    def hash_and_check(name: str, arr: np.ndarray) -> None:  # the worker's pass over the base tensor also checks it
        digest.update(name, arr)
        if not host_finite(arr):
            nonfinite_base.append(name)

    def decide(name: str, base_arr: np.ndarray | None) -> tuple[TensorPlan, float, float]:
        """The tensor's plan and, when it is merged under an adaptive α, its Σ τ_task² and Σ τ_safe²."""
        shape, dtype = task.specs[name]
        reason, safe = _copy_reason(name, tuple(shape), tuple(base.specs[name][0]), safety, safety_names,
                                    read=adaptive)
        rank = task.rank(name) if isinstance(task, LoraTask) else None
        planned = TensorPlan(name, tuple(shape), np.dtype(dtype), merge=reason is None, reason=reason, rank=rank)
        if reason is None and adaptive:  # a fixed α needs no norms: spare the read of the task model
            return planned, _task_sum_squares(allow_nonfinite, name, task, base_arr, base), \
                _finite_sum_squares(allow_nonfinite, name, safe, safety)
        return planned, 0.0, 0.0

    # The tensors are decided one per core at once (the norms' numpy loops release the GIL) and settled in name
    # order, so the sums, and the first error met, are those of one tensor after another.
    workers = cpu_threads.core_count()
    with ThreadPoolExecutor(1) as hasher, ThreadPoolExecutor(workers) as deciders, blas_threads(1):
        hashing, deciding = None, collections.deque()

        def settle() -> None:
            name, future = deciding.popleft()
            tensors[name], task_squares, safety_squares = future.result()
            sums["task"] += task_squares
            sums["safety"] += safety_squares

        for name in tqdm(sorted(base.specs), desc="merge pass 1", unit="tensor", disable=_disable(progress)):
            # Read only for the digest or α's norms: shapes come from the specs, and a zero delta is found by
            # `SafetyDelta.any_nonzero`, which stops at its first non-zero entry.
            base_arr = base.read(name) if hashing_all or (adaptive and name in task) else None
            if hashing is not None:
                hashing.result()
            hashing = hasher.submit(hash_and_check, name, base_arr) if hashing_all else None
            if name in task:
                deciding.append((name, deciders.submit(decide, name, base_arr)))
            while len(deciding) > workers:
                settle()
        while deciding:
            settle()
        if hashing is not None:
            hashing.result()
    if hashing_all:
        known = base_digest.Record(digest.hexdigest(), tuple(nonfinite_base))
        base_digest.remember(base, files, known)
    return tensors, sums, known.weights_blake2b if check else None, [n for n in nonfinite_base if n in task]


def _copy_reason(name: str, shape: tuple[int, ...], base_shape: tuple[int, ...], safety: SafetyDelta,
                 safety_names: set[str], read: bool) -> tuple[str | None, np.ndarray | None]:
    """Why tensor `name` is copied unchanged from the task model (None: it is merged), and τ_safe when `read` (α's
    norms need it whole; otherwise only as much of it is read as it takes to find a non-zero entry)."""
    if base_shape != shape:
        return f"shape {shape} differs from the base's {base_shape} (resized vocabulary?)", None
    if name not in safety_names:
        return "no safety delta for this tensor (outside the safety vector's scope)", None
    if tuple(safety.shape(name)) != shape:
        return f"safety delta shape {tuple(safety.shape(name))} differs from {shape}", None
    if not read:
        return (None if safety.any_nonzero(name) else "safety delta is zero"), None
    safe = safety.read(name)
    return (None if np.any(safe) else "safety delta is zero"), safe


def _task_sum_squares(allow: bool, name: str, task: TensorSource, base_arr: np.ndarray, base: TensorSource) -> float:
    """Σ τ_task² of one tensor: a LoRA task's from its factors in float64 (τ_task never formed; 0 where the adapter
    leaves the base), else that of task − base, checked (`_finite_sum_squares`)."""
    if isinstance(task, LoraTask):
        factors = task.factors(name)
        if factors is None:
            return 0.0
        total = float(factored_sq_norm(*(f.astype(np.float64) for f in factors)))
        if math.isfinite(total):
            return total
    return _finite_sum_squares(allow, name, task.read(name), task, base_arr, base)


def _finite_sum_squares(allow: bool, name: str, x: np.ndarray, x_source, minus: np.ndarray | None = None,
                        minus_source=None) -> float:
    """`_sum_squares`, checked: a non-finite sum is refused naming the file and tensor that holds the NaN or Inf,
    or (`allow`) recomputed over the finite entries only."""
    total = _sum_squares(x, minus)
    if math.isfinite(total):  # a finite sum of squares: every entry was finite (the check costs nothing)
        return total
    inputs = [(x_source, x)] + ([(minus_source, minus)] if minus is not None else [])
    if not allow:
        for source, arr in inputs:
            if not host_finite(arr):
                where = source.where(name) if isinstance(source, TensorSource) else \
                    (source.locate_nonfinite(name) or (source.what,))[0]
                raise input_error(where, name, arr)
    d = x.astype(np.float64).reshape(-1)
    if minus is not None:
        d -= minus.reshape(-1)
    d = d[np.isfinite(d)]
    return float(np.dot(d, d))


def _sum_squares(x: np.ndarray, minus: np.ndarray | None = None) -> float:
    """Σ (x − minus)² accumulated in float64 (norms of 8B models overflow float32 precision), chunk by chunk in a
    cache-sized buffer: no full-size float64 copy (SmolLM2-135M's τ_safe: 850 MB of fresh pages). The caller holds
    BLAS to one thread (`_pass_one`): np.dot then cannot spin threads on a busy machine, and takes a sixth of
    einsum's time per chunk."""
    x = x.reshape(-1)
    minus = None if minus is None else minus.reshape(-1)
    buffer = np.empty(min(x.size, _HOST_CHUNK), np.float64)
    total = 0.0
    for i in range(0, x.size, _HOST_CHUNK):
        d = buffer[:min(_HOST_CHUNK, x.size - i)]
        if minus is None:
            np.copyto(d, x[i:i + d.size])
        else:
            np.subtract(x[i:i + d.size], minus[i:i + d.size], out=d, dtype=np.float64)
        total += float(np.dot(d, d))
    return total


def _disable(progress: bool | None) -> bool | None:
    return None if progress is None else not progress


@functools.lru_cache(maxsize=64)
def _group_fn(method: str, options: tuple, mesh: Mesh, triplets: str | None = None, factored: bool = False,
              weights_only: bool = False):
    """jit(`_mapped`) for one group shape (the τ_task stack donated when the deltas are written over it: dense, and
    not `weights_only`)."""
    return jax.jit(_mapped(method, options, mesh, triplets, factored, weights_only),
                   donate_argnums=() if factored or weights_only else 0)


def _mapped(method: str, options: tuple, mesh: Mesh, triplets: str | None, factored: bool,
            weights_only: bool = False):
    """shard_map(lax.map(method)) for one group shape: every device merges its tensors one by one.

    Takes the τ_task stack, the τ_safe stack, the keys, α and the hints
    (stacks of precomputed triplets by role, `methods`); returns the merged deltas (float32), the per-tensor stats,
    per tensor whether τ_task, τ_safe and the delta are finite, and the triplets it computed for the cache.
    `weights_only` (a `Method.weighted` method): no deltas, and "the delta is finite" is left to the host form that
    forms them, which any non-finite weight reaches; the τ_safe stack may then be None when its triplets are among
    the hints (the method never reads it).
    `triplets`: None, "read" (triplets are among the hints) or "emit" (τ_safe's kept triplets, from the hints or
    computed here by the merge's solver, used by the method and returned for the cache). `factored`: τ_task comes as
    stacks of its factors (scale·B, A) of a LoRA task, not donated; τ_task is their product, and its triplets for a
    method that decomposes are the factors' (`factored.factored_triplets`), not an SVD.
    """
    fn = METHODS[method].fn
    opts = dict(options)

    def per_device(tau, safety, keys, alpha, hints):
        def one(a):
            task_i, safe_i, key_i, hints_i = a
            if factored:
                b_i, a_i = task_i
                task_i = b_i @ a_i
                if METHODS[method].uses_triplets:
                    hints_i = {**hints_i, "task": factored_triplets(b_i, a_i, b_i.shape[1])}
            if safe_i is None:  # weights only, τ_safe's triplets given: its values never enter a statistic
                safe_i = jnp.zeros_like(task_i)
            emitted = {}
            if triplets == "emit":
                emitted = {"safety": hints_i["safety"] if "safety" in hints_i else
                           top_triplets(safe_i, opts["keep"], opts.get("solver", "auto"))}
                hints_i = {**hints_i, **emitted}
            extra = {"hints": hints_i} if triplets or factored else {}
            delta, stats = fn(task_i, safe_i, alpha, jax.random.wrap_key_data(key_i), **extra, **opts)
            # The non-finite guard, fused into the merge: τ_task, τ_safe and the delta, each reduced to one bool.
            finite = jnp.stack([jnp.all(jnp.isfinite(task_i)), jnp.all(jnp.isfinite(safe_i)),
                                jnp.bool_(True) if weights_only else jnp.all(jnp.isfinite(delta))])
            return (None if weights_only else delta), stats, finite, emitted

        return jax.lax.map(one, (tau, safety, keys, hints))

    spec = P(GROUP_AXIS)
    return jax.shard_map(per_device, mesh=mesh, in_specs=(spec, spec, spec, P(), spec),
                         out_specs=(spec, spec, spec, spec))


@functools.lru_cache(maxsize=64)
def _split_fn(method: str, options: tuple, mesh: Mesh, triplets: str | None, count: int, weights_only: bool = False):
    """Like `_group_fn`, for a group of `count` dense matrices that does not fill whole rounds of the devices: the
    2·count decompositions (τ_task's and τ_safe's) are first spread over the devices as independent jobs, then
    the method runs with both as hints. A lone matrix's two SVDs (an 8B layer's down projection) thus run on two
    devices at once, instead of one device doing both while another repeats them as padding. Each job is the
    same single-device `top_triplets` as in `_group_fn`, so the bytes do not change."""
    opts = dict(options)
    spec = P(GROUP_AXIS)
    decompose = jax.shard_map(
        lambda x: jax.lax.map(lambda a: top_triplets(a, opts["keep"], opts.get("solver", "auto")), x),
        mesh=mesh, in_specs=spec, out_specs=spec)
    merge_ = _mapped(method, options, mesh, "emit" if triplets == "emit" else "read", False, weights_only)

    def split(tau, safety, keys, alpha, hints):
        jobs = jnp.concatenate([tau[:count], safety[:count]])
        jobs = jnp.concatenate([jobs, jnp.zeros((-jobs.shape[0] % mesh.size, *jobs.shape[1:]), jobs.dtype)])
        u, s, v = decompose(jobs)
        row = jnp.minimum(jnp.arange(tau.shape[0]), count - 1)  # padding rows repeat the last tensor
        hints = {**hints, "task": (u[row], s[row], v[row]), "safety": (u[count + row], s[count + row], v[count + row])}
        return merge_(tau, safety, keys, alpha, hints)

    return jax.jit(split, donate_argnums=() if weights_only else 0)


def tensor_key(seed: int, name: str) -> np.ndarray:
    """Raw PRNG key data for one tensor: fixed by (seed, name), so random methods do not depend on devices."""
    return tensor_keys(seed, [name])[0]


@functools.partial(jax.jit, static_argnums=0)
def _fold_in_all(seed: int, data: jax.Array) -> jax.Array:
    return jax.vmap(lambda d: jax.random.key_data(jax.random.fold_in(jax.random.key(seed), d)))(data)


def tensor_keys(seed: int, names: list[str]) -> np.ndarray:
    """`tensor_key` of every name, in one call (one dispatch per group instead of one per tensor)."""
    return np.asarray(_fold_in_all(seed, np.array([zlib.crc32(n.encode()) for n in names], np.uint32)))


def merge_mesh(devices: list | None = None) -> Mesh:
    """A 1-D mesh over all devices (every host's, under jax.distributed) that groups are split over; warns when
    that is one CPU device of a multi-core machine (`cpu_threads.warn_if_one_core_used`)."""
    if devices is None:
        devices = jax.devices()
        warn_if_one_core_used(devices)
    devices = list(devices)
    return Mesh(np.array(devices), (GROUP_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def _order(plan_: MergePlan, task: TensorSource, group_bytes: int, devices: int) -> tuple[list[str], list[list[str]]]:
    """The copied tensors (in the task model's order) and the groups of merged ones, as pass 2 yields them."""
    copied = [name for name in task.specs if name in plan_.tensors and not plan_.tensors[name].merge]
    return copied, plan_.groups(group_bytes, devices)


def output_layout(plan_: MergePlan, task: TensorSource, group_bytes: int = DEFAULT_GROUP_BYTES,
                  devices: int = 1) -> dict[str, jax.ShapeDtypeStruct]:
    """Every tensor of the merged model as {name: shape and dtype}, in the order `run` yields them over `devices`
    (what the output's writer is declared)."""
    copied, groups = _order(plan_, task, group_bytes, devices)
    return {name: jax.ShapeDtypeStruct(plan_.tensors[name].shape, plan_.tensors[name].dtype)
            for name in copied + [name for group in groups for name in group]}


def run(plan_: MergePlan, base: TensorSource, task: TensorSource, safety: SafetyDelta, method: str,
        options: dict[str, Any], seed: int = 0, mesh: Mesh | None = None, group_bytes: int = DEFAULT_GROUP_BYTES,
        progress: bool | None = None, allow_nonfinite: bool = False, cache_decomposition: bool = True,
        sinks: Sinks | None = None) -> tuple[Generator[MergedTensor, None, None], dict[str, str | None]]:
    """Pass 2: (a generator of `MergedTensor` records, copied tensors first, then group by group, in the order of
    `output_layout`; what became of the safety vector's decomposition cache, filled in as the generator runs:
    {"state", "file", and for a method that decomposes "solver"}).

    A method that decomposes the deltas reads τ_safe's triplets from the safety vector's cache
    (merging/decomposition.py) when there is one for this vector and solver, else computes them and, with an exact
    solver (`EXACT_SOLVERS`; "auto" is the platform's) and `cache_decomposition`, writes the cache for the next
    merge.

    `sinks(name)`, when given, opens the output's `TensorSink` for a tensor: the tensors formed on the host
    (`HostForm`) are written there chunk by chunk, and their records hold no array (`MergedTensor`).

    Every yielded tensor is finite: a NaN or Inf in an input is refused naming its file and tensor (unless
    `allow_nonfinite`), and a non-finite result is refused always (a NonFiniteError from the generator, before
    the writer can finish the folder).
    """
    options = method_options(method, options)
    mesh = mesh or merge_mesh()
    # The solver the decompositions use here ("auto": the platform's exact one), named for the cache and the report.
    solver = solver_for(options.get("solver", "auto"), mesh.devices.flat[0].platform)
    if "solver" in options:
        options = {**options, "solver": solver}
    copied, groups = _order(plan_, task, group_bytes, mesh.size)
    alpha = put(np.float32(plan_.alpha), NamedSharding(mesh, P()))
    what = f"merge {method} (α = {plan_.alpha:.4g})"
    form = METHODS[method].host
    if form is not None:
        # An element-wise method: on the host, fused with the reads (DESIGN.md, Merging).
        merged = [name for group in groups for name in group]
        records = _host_records(merged, plan_, base, task, safety, lambda _: form, allow_nonfinite, what, sinks)
        return _with_bar(_copied_records(copied, task, allow_nonfinite, what), records, len(merged), method,
                         progress), {"state": "not used (the method does not decompose)", "file": None}
    cache, mode, writer, outcome = _decomposition(plan_, safety, method, options.get("keep"), solver,
                                                  cache_decomposition)
    if METHODS[method].uses_triplets:
        outcome["solver"] = solver
    # Every tensor's PRNG key up front: computed per group, the keys would queue behind the running group on the
    # device, and reading the next group would wait for it (the pipeline would stall).
    names = copied + [name for group in groups for name in group]
    keys = dict(zip(names, tensor_keys(seed, names))) if names else {}

    # A weighted method's devices give only the statistics and the host forms the deltas (`Method.weighted`: fewer
    # bytes each way, and no delta stack; a LoRA task's τ_task from its factors on both sides).
    weights_only = METHODS[method].weighted

    def load(group: list[str]) -> tuple:
        # τ_safe's stack is needed on the devices only to decompose it, or to form the deltas there.
        needs_safety = not weights_only or (len(plan_.tensors[group[0]].shape) == 2 and mode != "read")
        return _load_group(plan_, base, task, safety, keys, mesh, cache if mode == "read" else None, needs_safety,
                           group)

    def merge_group(group: list[str], inputs: tuple) -> tuple:  # asynchronous: returns before it is done
        matrix = len(plan_.tensors[group[0]].shape) == 2
        factored = plan_.tensors[group[0]].rank is not None
        settings = tuple(sorted(options.items()))
        if matrix and not factored and mode != "read" and METHODS[method].uses_triplets and len(group) % mesh.size:
            fn = _split_fn(method, settings, mesh, mode, len(group), weights_only)
        else:
            fn = _group_fn(method, settings, mesh, mode if matrix else None, factored, weights_only)
        return fn(*inputs[:3], alpha, inputs[3])

    def produce() -> Iterator[MergedTensor]:
        yield from _copied_records(copied, task, allow_nonfinite, what)
        bar = tqdm(total=sum(len(g) for g in groups), desc=f"merge {method}", unit="tensor",
                   disable=_disable(progress))
        try:
            with bar, _one_blas_thread_on_cpu(mesh):
                # Software pipeline: while group g is merged, group g+1 is read; its merge is launched before
                # g's results go to the writer, so reading and writing overlap with the decompositions.
                running = merge_group(groups[0], load(groups[0])) if groups else None
                for g, group in enumerate(groups):
                    following = load(groups[g + 1]) if g + 1 < len(groups) else None
                    deltas, stats, emitted = _group_results(group, running, base, task, safety, allow_nonfinite,
                                                            what)
                    if following is not None:
                        running = merge_group(groups[g + 1], following)
                    del following
                    if writer is not None and "safety" in emitted:
                        for i, name in enumerate(group):
                            writer.add(name, tuple(t[i] for t in emitted["safety"]))
                    if deltas is None:
                        yield from _host_records(group, plan_, base, task, safety, _weighted_forms(group, stats),
                                                 allow_nonfinite, what, sinks)
                    else:
                        yield from _merged_records(group, deltas, stats, base, plan_, what)
                    bar.update(len(group))
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        if writer is not None:
            written = writer.commit()
            outcome.update(state="written" if written else "not written (the file could not be published)",
                           file=str(written) if written else None)

    return produce(), outcome


def _with_bar(copied: Iterator[MergedTensor], merged: Iterator[MergedTensor], count: int, method: str,
              progress: bool | None) -> Iterator[MergedTensor]:
    """The copied records, then the merged ones under a progress bar of `count` tensors."""
    yield from copied
    with tqdm(total=count, desc=f"merge {method}", unit="tensor", disable=_disable(progress)) as bar:
        for record in merged:
            yield record
            bar.update()


def _host_records(names: list[str], plan_: MergePlan, base: TensorSource, task: TensorSource, safety: SafetyDelta,
                  form_of: Callable[[str], HostForm], allow_nonfinite: bool, what: str,
                  sinks: Sinks | None) -> Iterator[MergedTensor]:
    """Each of `names` merged by its host form (`form_of(name)`): τ_task, τ_safe, the delta and base + delta computed
    chunk by chunk in cache-sized buffers, from the mapped inputs straight into the output array, or with `sinks`
    into the output file (no stacks, no devices)."""
    alpha = np.float32(plan_.alpha)
    workers = cpu_threads.core_count()
    free = queue.SimpleQueue()  # one set of scratch buffers per worker thread
    for _ in range(workers):
        free.put([np.empty(_HOST_CHUNK, np.float32) for _ in range(2)] +
                 [np.empty(_HOST_CHUNK, np.float64) for _ in range(2)])

    def one(name: str) -> MergedTensor:
        scratch = free.get()
        try:
            return _host_merge(name, plan_.tensors[name], base, task, safety, form_of(name), alpha, scratch,
                               allow_nonfinite, what, None if sinks is None else sinks(name))
        finally:
            free.put(scratch)

    # One tensor per core at once (numpy's ufuncs release the GIL), yielded in order; BLAS single-threaded, so that
    # the sums' dot products do not spin threads beside the workers.
    with blas_threads(1), ThreadPoolExecutor(workers) as pool:
        pending: collections.deque = collections.deque()
        try:
            for name in names:
                pending.append(pool.submit(one, name))
                if len(pending) > workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def _host_merge(name: str, spec: TensorPlan, base: TensorSource, task: TensorSource, safety: SafetyDelta,
                form: HostForm, alpha: np.float32, scratch: list[np.ndarray], allow_nonfinite: bool,
                what: str, sink: TensorSink | None = None) -> MergedTensor:
    """One tensor by `form`, checked finite: a non-finite input always reaches the delta (`HostForm`), so the one
    check of the result also finds a bad input, which is then named as the device path names it. With `sink`, the
    result goes there chunk by chunk (closed once all of it is written and finite) and the record holds no array."""
    b, parts = base.read(name).reshape(-1), safety.parts(name)
    n, step = b.size, _HOST_CHUNK
    # A LoRA task's τ_task comes from its factors (scale·B, A), a block of whole rows per step: never task − base,
    # so the merged model the task stands for is never formed.
    factors = task.factors(name) if spec.rank is not None else None
    if factors is None:
        t = task.read(name).reshape(-1)
    else:
        scaled_b, a = factors
        step = max(1, _HOST_CHUNK // a.shape[1]) * a.shape[1]
        if step > scratch[0].size:  # a row longer than the scratch: buffers of one row for this tensor
            scratch = [np.empty(step, x.dtype) for x in scratch]

    def chunks() -> Iterator[tuple[slice, np.ndarray, np.ndarray]]:  # (where, τ_task, τ_safe) in the scratch
        for i in range(0, n, step):
            at = slice(i, min(i + step, n))
            tau, safe = scratch[0][:at.stop - i], scratch[1][:at.stop - i]
            if factors is None:
                np.subtract(t[at], b[at], out=tau, dtype=np.float32)
            else:
                rows = i // a.shape[1]
                np.matmul(scaled_b[rows:rows + tau.size // a.shape[1]], a, out=tau.reshape(-1, a.shape[1]))
            if len(parts) == 1:
                np.copyto(safe, parts[0][at], casting="same_kind")
            else:
                np.subtract(parts[0][at], parts[1][at], out=safe, dtype=np.float32)
            yield at, tau, safe

    sums = None
    if form.uses_sums:  # accumulated in float64, each chunk's products too
        totals = np.zeros(3)
        for at, tau, safe in chunks():
            x, y = scratch[2][:tau.size], scratch[3][:tau.size]
            np.copyto(x, tau)
            np.copyto(y, safe)
            totals += (np.dot(x, x), np.dot(y, y), np.dot(x, y))  # BLAS on one thread (`_host_records`)
        sums = tuple(float(v) for v in totals)
    apply, stats = form.prepare(alpha, sums)
    if sink is not None:  # each chunk straight into the output file: no merged array, no second copy
        finite = True
        for at, tau, safe in chunks():
            apply(tau, safe)
            np.add(b[at], safe, out=safe, dtype=np.float32)
            piece = safe if spec.dtype == np.float32 else safe.astype(spec.dtype)  # rounded once, as below
            finite = finite and host_finite(piece)
            sink.write(at.start, piece)
        if finite:
            sink.close()
            return MergedTensor(name, None, stats)
        delta = _host_delta(name, base, task, safety, apply, allow_nonfinite, what)  # refuses a bad input or delta
        merged = np.add(b, delta, dtype=np.float32).astype(spec.dtype)
    else:
        merged = np.empty(spec.shape, spec.dtype)
        flat = merged.reshape(-1)
        for at, tau, safe in chunks():
            apply(tau, safe)
            if spec.dtype == np.float32:
                np.add(b[at], safe, out=flat[at], dtype=np.float32)
            else:  # added in float32, then rounded once to the dtype, as `_merged_records` does
                np.add(b[at], safe, out=safe, dtype=np.float32)
                flat[at] = safe
    if not host_finite(merged):
        if sink is None:
            _host_delta(name, base, task, safety, apply, allow_nonfinite, what)  # refuses a bad input or delta
        check_output(merged, what, name, " (overflow in the output dtype, or a non-finite base tensor let through "
                                         "by allow_nonfinite)")
    return MergedTensor(name, merged, stats)


def _host_delta(name: str, base: TensorSource, task: TensorSource, safety: SafetyDelta,
                apply: Callable[[np.ndarray, np.ndarray], None], allow_nonfinite: bool, what: str) -> np.ndarray:
    """A host-form tensor's delta, whole (flat float32), computed again to name a non-finite result's cause: a
    non-finite input or delta is refused as the device path refuses it."""
    tau = np.subtract(task.read(name), base.read(name), dtype=np.float32).reshape(-1)
    delta = np.array(safety.read(name), np.float32).reshape(-1)
    finite = [host_finite(tau), host_finite(delta)]
    apply(tau, delta)
    _check_group([name], np.array([finite + [host_finite(delta)]]), base, task, safety, allow_nonfinite, what,
                 lambda _: delta)
    return delta


def _weighted_forms(group: list[str], stats: dict[str, np.ndarray]) -> Callable[[str], HostForm]:
    """The host form of each tensor of a `Method.weighted` group, from the weights the devices computed: the delta
    τ_task + w·(α·τ_safe) in the method's order of float32 operations, each rounded (XLA fuses the last two into an
    FMA, so the devices' deltas differ by at most one ulp)."""
    index = {name: i for i, name in enumerate(group)}

    def form_of(name: str) -> HostForm:
        i = index[name]
        weight, tensor_stats = np.float32(stats["weight"][i]), {k: float(v[i]) for k, v in stats.items()}

        def prepare(alpha: np.float32, _: None) -> tuple[Callable[[np.ndarray, np.ndarray], None], dict[str, float]]:
            def apply(tau: np.ndarray, safe: np.ndarray) -> None:
                np.multiply(safe, alpha, out=safe)
                np.multiply(safe, weight, out=safe)
                np.add(tau, safe, out=safe)

            return apply, tensor_stats

        return HostForm(prepare)

    return form_of


def _decomposition(plan_: MergePlan, safety: SafetyDelta, method: str, keep: float | None, solver: str, write: bool
                   ) -> tuple[decomposition.Cache | None, str | None, decomposition.Writer | None, dict]:
    """(cache, mode for the matrix groups: "read" | "emit" | None, the cache writer or None, the outcome record
    {"state", "file"}) for a merge whose decompositions use `solver`."""
    if not METHODS[method].uses_triplets:
        return None, None, None, {"state": "not used (the method does not decompose)", "file": None}
    if safety.folder is None:
        return None, None, None, {"state": "none (aligned − harmful: no safety-vector folder)", "file": None}
    cache = decomposition.Cache(safety.folder, keep, solver)
    matrices = plan_.matrices()
    if cache.covers(matrices):
        return cache, "read", None, {"state": "read", "file": str(cache.find())}
    if not write or solver not in EXACT_SOLVERS:
        why = "disabled" if not write else f"the {solver} solver is not exact"
        return None, None, None, {"state": f"computed, not cached ({why})", "file": None}
    writer = cache.writer(matrices) if jax.process_index() == 0 else None
    if writer is None and jax.process_count() == 1:
        return None, None, None, {"state": "computed, not cached (the folder is read-only)", "file": None}
    # Every process runs the same program; process 0 writes.
    return None, "emit", writer, {"state": "computed, being written", "file": None}


def _load_group(plan_: MergePlan, base: TensorSource, task: TensorSource, safety: SafetyDelta,
                keys: dict[str, np.ndarray], mesh: Mesh, cache: decomposition.Cache | None, with_safety: bool,
                group: list[str]) -> tuple[jax.Array | None, ...]:
    """One group's τ_task (a LoRA task's: its factors) and τ_safe stacks (float32; None unless `with_safety`), PRNG
    keys and hints (τ_safe's triplets from `cache`, for matrices), placed on the mesh."""
    sharding = NamedSharding(mesh, P(GROUP_AXIS))
    padded = group + [group[-1]] * (-len(group) % mesh.size)  # whole rounds over the devices
    shape = (len(padded), *plan_.tensors[group[0]].shape)
    if plan_.tensors[group[0]].rank is not None:  # a LoRA task: (scale·B, A) stacks, multiplied on the device
        factors = [task.factors(name) for name in padded]
        placed = tuple(put(np.stack([f[part] for f in factors]), sharding) for part in range(2))
    else:
        tau = aligned_empty(shape, np.float32)  # placed without a copy
        for i, name in enumerate(padded):  # filled in place, one pass per tensor: no second copy of a stack
            np.subtract(task.read(name), base.read(name), out=tau[i], dtype=np.float32)
        placed = put(tau, sharding)
        del tau
    safe = None
    if with_safety:
        safe = aligned_empty(shape, np.float32)
        for i, name in enumerate(padded):
            safety.read_into(name, safe[i])
    hints = {}
    if cache is not None and len(shape) == 3:
        read = [cache.read(name, shape[1:]) for name in padded]
        hints["safety"] = tuple(put(np.stack([t[part] for t in read]), sharding) for part in range(3))
    return (placed, None if safe is None else put(safe, sharding), put(np.stack([keys[name] for name in padded]),
                                                                        sharding), hints)


def _copied_records(copied: list[str], task: TensorSource, allow_nonfinite: bool,
                    what: str) -> Iterator[MergedTensor]:
    """The tensors copied unchanged from the task model, each checked finite."""
    for name in copied:
        arr = task.read(name)
        if not host_finite(arr):
            raise input_error(task.where(name), name, arr) if not allow_nonfinite else \
                output_error(what, name, arr, "; it is copied unchanged from the task model")
        yield MergedTensor(name, arr, {})


def _one_blas_thread_on_cpu(mesh: Mesh) -> contextlib.AbstractContextManager:
    """One decomposition per CPU device at once, each single-threaded: the bytes do not depend on the device count,
    and spinning LAPACK threads cannot stall a busy machine (kernels/cpu_threads.py). Other devices: no change."""
    on_cpu = all(d.platform == "cpu" for d in mesh.devices.flat)
    return blas_threads(1) if on_cpu else contextlib.nullcontext()


def _group_results(group: list[str], running: tuple, base: TensorSource, task: TensorSource, safety: SafetyDelta,
                   allow_nonfinite: bool, what: str
                   ) -> tuple[list[np.ndarray] | None, dict[str, np.ndarray], dict[str, tuple]]:
    """A launched group merge's (deltas, None when the devices gave weights only, stats, triplets emitted for the
    cache) on the host, once its inputs and deltas are checked finite."""
    deltas, stats, finite, emitted = running
    finite = fully_replicated_numpy(finite)
    _check_group(group, finite, base, task, safety, allow_nonfinite, what,
                 lambda i: fully_replicated_numpy(deltas)[i])
    # Rows as views of the devices' buffers where possible: a gathered host copy would be one more stack in memory.
    return (None if deltas is None else host_rows(deltas), {k: fully_replicated_numpy(v) for k, v in stats.items()},
            {role: tuple(host_rows(t) for t in triplets) for role, triplets in emitted.items()})


def _merged_records(group: list[str], deltas: list[np.ndarray], stats: dict[str, np.ndarray], base: TensorSource,
                    plan_: MergePlan, what: str) -> Iterator[MergedTensor]:
    """Each tensor of a group: base + delta (the base re-read) in the task model's dtype, checked finite."""
    for i, name in enumerate(group):
        merged = np.add(base.read(name), deltas[i], dtype=np.float32)  # one pass: cast, add, fresh array
        merged = merged.astype(plan_.tensors[name].dtype, copy=False)
        check_output(merged, what, name, " (overflow in the output dtype, or a non-finite base tensor "
                                         "let through by allow_nonfinite)")
        yield MergedTensor(name, merged, {k: float(v[i]) for k, v in stats.items()})


def _check_group(group: list[str], finite: np.ndarray, base: TensorSource, task: TensorSource, safety: SafetyDelta,
                 allow: bool, what: str, delta_of: Callable[[int], np.ndarray]) -> None:
    """Refuse a group whose inputs (τ_task = task − base, τ_safe) or deltas are not finite, naming the tensor and,
    for an input, the file that holds the NaN or Inf (found by re-reading the few tensors concerned)."""
    for i, name in enumerate(group):
        tau_ok, safe_ok, delta_ok = (bool(v) for v in finite[i])
        if not allow and not (tau_ok and safe_ok):
            for source in (task, base):
                arr = source.read(name)
                if not host_finite(arr):
                    raise input_error(source.where(name), name, arr)
            located = safety.locate_nonfinite(name)
            if located is not None:
                raise input_error(located[0], name, located[1])
            raise input_error(safety.what, name, safety.read(name))  # aligned − harmful overflowed
        if not delta_ok:
            why = "; an input holds NaN or Inf (allowed by allow_nonfinite)" if not (tau_ok and safe_ok) else \
                "; the method's arithmetic overflowed"
            raise output_error(what, name, delta_of(i), why)
