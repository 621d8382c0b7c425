"""Merge methods: one registry, one signature, per tensor.

Each method maps (τ_task, τ_safe, α, key, **options) of ONE tensor (float32) to (delta, stats); the
merged tensor is θ_base + delta. τ_task = θ_task − θ_base, τ_safe = θ_aligned − θ_harm. `stats`
always has `interference` and `weight` (NaN where a method has none), for the report. Methods are
pure and jit-compatible with static options, so the executor stacks same-shaped tensors and maps
a method over them on every device. `register` wraps every method in one check, run when it is traced
(nothing per call under jit): τ_task is a vector or a matrix and τ_safe has its shape. A method that
decomposes the deltas takes a `hints` parameter: {"task" | "safety": leading singular triplets of τ_task
or of the unscaled τ_safe} known beforehand (the safety vector's cached decomposition, a LoRA adapter's
factors), used instead of decomposing again (`Method.uses_triplets`).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from enchtable_jax.errors import EnchtableError
from enchtable_jax.kernels.spectral import DEFAULT_KEEP, DEFAULT_SCALE, SOLVERS, Triplets, interference, \
    interference_blocks, polar, significant, top_triplets
from enchtable_jax.options import FRACTION, POSITIVE, SEED, Range

Stats = dict[str, jax.Array]
NAN = float("nan")
# Options of every merge, whatever the method: α would flip or blow up the safety delta outside these.
# β of the paper's adaptive scale α = β·‖τ_task‖/‖τ_safe‖ when neither α nor β is given.
DEFAULT_BETA = 0.1
MERGE_OPTIONS = {
    "alpha": Range(0, optional=True),  # fixed scale of τ_safe (None: the method's default)
    "beta": Range(0, optional=True),  # adaptive scale: α = β·‖τ_task‖/‖τ_safe‖
    "seed": SEED,  # of the random methods (dare)
}


@dataclasses.dataclass(frozen=True)
class Option:
    """A method option, declared once: default, one line of help, valid values (a numeric `Range`, or `choices`),
    and whether `enchtable merge`/`enchant` give it a flag of its own (`flag`; the others are set with --set).

    The method's function takes the option as a keyword-only parameter without a default (`register` fills it in
    from here); `method_options` checks given values against the range or choices, and the CLI's flag parses with
    the same `Range`.
    """

    default: Any
    help: str
    range: Range | None = None
    choices: tuple | None = None
    flag: bool = False

    @property
    def type(self) -> type:
        """The Python type of the option's values."""
        if self.choices is not None:
            return type(self.choices[0])
        return int if self.range is not None and self.range.integer else float

    def check(self, name: str, value: Any) -> Any:
        if self.choices is not None and (isinstance(value, (list, dict)) or value not in self.choices):
            raise EnchtableError(f"option {name} must be one of {', '.join(map(repr, self.choices))}, got {value!r}")
        return value if self.range is None else self.range.check(name, value)


Sums = tuple[float, float, float]  # Σ τ_task², Σ τ_safe², Σ τ_task·τ_safe of one tensor (float64)
Apply = Callable[[np.ndarray, np.ndarray], None]  # (τ_task chunk, τ_safe chunk): the delta written over τ_safe


@dataclasses.dataclass(frozen=True)
class HostForm:
    """An element-wise method's formula in numpy, for the executor to run on the host chunk by chunk, fused with
    the reads and the base add (DESIGN.md, Merging: why): `prepare(α, sums)` gives the chunk function and the
    tensor's stats; `sums` (needed when `uses_sums`) are the tensor's `Sums`, else None. It must equal `fn` to
    float32 rounding, and let any non-finite τ_task or τ_safe entry reach the delta (so that the executor's one
    check of the merged tensor also guards the inputs)."""

    prepare: Callable[[np.float32, Sums | None], tuple[Apply, dict[str, float]]]
    uses_sums: bool = False


@dataclasses.dataclass(frozen=True)
class Method:
    """A registered merge method."""

    name: str
    fn: Callable[..., tuple[jax.Array, Stats]]
    summary: str  # formula and paper, one line
    options: dict[str, Option]
    adaptive_alpha: bool = False  # default α = β·‖τ_task‖/‖τ_safe‖ (else a fixed α, default 1)
    uses_alpha: bool = True  # False: α does not enter the formula (nothing to scale or calibrate)
    host: HostForm | None = None  # the formula in numpy, for a method without options that is element-wise
    # True: the delta is τ_task + w·(α·τ_safe), w the `weight` statistic, for every tensor: the executor then asks
    # the devices for the statistics alone and forms the delta on the host (`executor`, DESIGN.md, Merging)
    weighted: bool = False

    @property
    def uses_triplets(self) -> bool:
        """Whether the method decomposes the deltas, and so takes precomputed singular triplets (`hints`)."""
        return "hints" in inspect.signature(self.fn).parameters


METHODS: dict[str, Method] = {}


def check_strength(method: str, alpha: float | None, beta: float | None, names: tuple[str, str] = ("alpha", "beta")
                   ) -> None:
    """Refuse α and β together (α fixed and α = β·‖τ_task‖/‖τ_safe‖ exclude each other; one would be ignored) and
    either for a method whose formula has no α (Method.uses_alpha False): nothing would scale, yet the report
    would show an α."""
    if alpha is not None and beta is not None:
        raise EnchtableError(f"options {names[0]} and {names[1]} exclude each other: give {names[0]} (a fixed α) or "
                             f"{names[1]} (α = β·‖τ_task‖/‖τ_safe‖), not both")
    spec = METHODS.get(method)
    if spec is not None and not spec.uses_alpha and (alpha is not None or beta is not None):
        given = names[0] if alpha is not None else names[1]
        raise EnchtableError(f"option {given} does not apply to method {method}: its formula has no α to scale; "
                             f"drop {given}")


def register(name: str, summary: str, adaptive_alpha: bool = False, uses_alpha: bool = True,
             host: HostForm | None = None, weighted: bool = False, **options: Option):
    """Decorator adding a method to `METHODS`; its options are the keyword-only parameters of the function, whose
    values `Method.fn` fills in from `options` when a call leaves them out."""
    if host is not None and options:
        raise TypeError(f"merge method {name}: a host form takes no options")

    def add(fn):
        METHODS[name] = Method(name, _with_declared_defaults(name, fn, options), summary, options, adaptive_alpha,
                               uses_alpha, host, weighted)
        return fn

    return add


def _with_declared_defaults(name: str, fn: Callable, options: dict[str, Option]) -> Callable:
    """`fn` with every option not given taken from its declaration. The function itself declares no default, so
    there is no second copy to drift: its keyword-only parameters must be exactly the declared options."""
    signature = inspect.signature(fn)
    keywords = [p for p in signature.parameters.values() if p.kind is p.KEYWORD_ONLY]
    if {p.name for p in keywords} != set(options) or any(p.default is not p.empty for p in keywords):
        raise TypeError(f"merge method {name}: its keyword-only parameters {[p.name for p in keywords]} must be its "
                        f"declared options {list(options)}, without defaults (register declares them)")
    defaults = {option: o.default for option, o in options.items()}

    takes_hints = "hints" in signature.parameters

    @functools.wraps(fn)
    def method(task, safety, alpha, key, hints=None, **given):
        # One tensor at a time: a stacked group passed unmapped, or τ_safe of another tensor, would merge silently.
        chex.assert_rank(task, {1, 2}, custom_message=f"merge method {name}: τ_task is one tensor's delta")
        chex.assert_equal_shape([task, safety], custom_message=f"merge method {name}: τ_task and τ_safe")
        extra = {"hints": hints or {}} if takes_hints else {}
        return fn(task, safety, alpha, key, **extra, **{**defaults, **given})

    method.__signature__ = signature.replace(parameters=[
        p.replace(default=defaults[p.name]) if p.name in defaults else p for p in signature.parameters.values()])
    return method


def _known_triplets(hints: Mapping[str, Triplets], safety: jax.Array, alpha: jax.Array, keep: float,
                    solver: str = "auto") -> dict[str, Triplets]:
    """The triplets by role for a method that decomposes: the task's when given, and α·τ_safe's as the unscaled
    τ_safe's (given, or decomposed here) with S scaled by α ≥ 0 (the singular vectors stay). Decomposing the
    unscaled delta in every case makes a merge's bytes the same whether τ_safe's triplets come from the
    cache or not."""
    u, s, v = top_triplets(safety, keep, solver, hints.get("safety"))
    return {**hints, "safety": (u, alpha * s, v)}


def _stats(interference_value=NAN, weight=NAN) -> Stats:
    return {"interference": jnp.asarray(interference_value, jnp.float32), "weight": jnp.asarray(weight, jnp.float32)}


@register("enchtable", "θ_base + τ_task + w·α·τ_safe, w = exp(−ι(τ_task, α·τ_safe)) per matrix (EnchTable, "
                       "Wu et al. 2025)", adaptive_alpha=True, weighted=True,
          keep=Option(DEFAULT_KEEP, "fraction γ of singular triplets kept per delta", FRACTION, flag=True),
          interference_scale=Option(DEFAULT_SCALE, "scale of ι", POSITIVE, flag=True),
          solver=Option("auto", "top triplets by 'svd' (float32, exact), 'gram64' (eigh of the smaller Gram matrix in "
                                "float64, exact: faster on CPU), 'gram' (the same in float32: faster, accurate to "
                                "~ε·(σ1/σk)²) or 'auto' (gram64 on CPU, else svd)", choices=SOLVERS),
          learnable=Option(False, "learn the safety weight m0 + m by gradient descent on ι instead of exp(−ι) "
                                  "(experimental: ι is linear in |m0 + m|, see DESIGN.md)", choices=(False, True),
                           flag=True),
          m_init=Option(0.5, "learnable: initial m", Range()), m0=Option(0.5, "learnable: offset m0", Range()),
          lr=Option(1e3, "learnable: SGD learning rate", POSITIVE),
          steps=Option(40, "learnable: SGD steps", Range(0, 10_000, integer=True)))
def enchtable(task, safety, alpha, key, hints, *, keep, interference_scale, solver, learnable, m_init, m0, lr,
              steps):
    scaled = alpha * safety
    if task.ndim != 2:
        return task + scaled, _stats(weight=1.0)
    known = _known_triplets(hints, safety, alpha, keep, solver)
    if not learnable:
        iota = interference(task, scaled, keep, interference_scale, solver, known)
        weight = jnp.exp(-iota)
        return task + weight * scaled, _stats(iota, weight)
    # Scaling a matrix by c keeps its singular vectors and scales its singular values by |c|, so one
    # pair of SVDs serves every step of the descent on c = m0 + m.
    u1, s1, v1 = significant(top_triplets(task, keep, solver, known.get("task")), task.shape)
    u2, s2, v2 = significant(top_triplets(scaled, keep, solver, known.get("safety")), task.shape)
    r = jnp.maximum(jnp.count_nonzero(s1) + jnp.count_nonzero(s2), 1)

    def iota_of(m):
        return interference_scale * interference_blocks(u1, s1, v1, u2, jnp.abs(m0 + m) * s2, v2) / r**2

    m = jax.lax.fori_loop(0, steps, lambda _, m: m - lr * jax.grad(iota_of)(m), jnp.float32(m_init))
    weight = m0 + m
    return task + weight * scaled, _stats(iota_of(m), weight)


def _task_arithmetic_host(alpha: np.float32, sums: Sums | None) -> tuple[Apply, dict[str, float]]:
    def apply(task: np.ndarray, safety: np.ndarray) -> None:  # task + α·τ_safe, as `task_arithmetic`
        np.multiply(safety, alpha, out=safety)
        np.add(task, safety, out=safety)

    return apply, {"interference": NAN, "weight": float(alpha)}


@register("task_arithmetic", "θ_base + τ_task + α·τ_safe (task arithmetic, Ilharco et al. 2023; = RESTA, Bhardwaj "
                             "et al. 2024, with a real scale α)", host=HostForm(_task_arithmetic_host))
def task_arithmetic(task, safety, alpha, key):
    return task + alpha * safety, _stats(weight=alpha)


def _ranked_before(bits: jax.Array, count: int) -> jax.Array:
    """Mask of the `count` (0 < count < n) entries of largest `bits` (ties in index order, as a stable sort).

    Selection instead of a sort: a bisection on the value of the count-th largest entry (32 counting
    passes over the array), then the ties at that value taken first to last. Several times faster than
    an argsort on CPU for the 10⁷–10⁸ entries of an embedding matrix.
    """

    def bisect(_, bounds):  # invariant: #(bits ≥ lo) ≥ count > #(bits ≥ hi)
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        enough = jnp.sum(bits >= mid) >= count
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)

    # The bounds start from the data (0·bits[0]) so that, under shard_map, the loop carry has the same
    # per-device ("varying") type as the body's result.
    zero = bits[0] * 0
    lo, _ = jax.lax.fori_loop(0, 32, bisect, (zero, zero + (2**31 - 1)))
    above, tied = bits > lo, bits == lo
    return above | (tied & (jnp.cumsum(tied) <= count - jnp.sum(above)))


def _top_magnitude_mask(x: jax.Array, fraction: float, skip: float = 0.0) -> jax.Array:
    """Mask of the entries ranked [⌊skip·n⌋, ⌊skip·n⌋ + ⌊fraction·n⌋) by decreasing magnitude."""
    # Non-negative floats order as their int32 bit patterns do.
    bits = jax.lax.bitcast_convert_type(jnp.abs(x).reshape(-1), jnp.int32)
    n = bits.shape[0]
    start, count = int(skip * n), int(fraction * n)

    def before(c: int) -> jax.Array:
        return jnp.full(n, c >= n) if c <= 0 or c >= n else _ranked_before(bits, c)

    return (before(start + count) & ~before(start)).reshape(x.shape)


@register("ties", "trim each delta to its top `density` magnitudes, elect the sign of the weighted sum, average the "
                  "agreeing entries (TIES-Merging, Yadav et al. 2023); weights 1 (task) and α (safety)",
          density=Option(0.5, "fraction of entries kept per delta", FRACTION, flag=True))
def ties(task, safety, alpha, key, *, density):
    weights = jnp.stack([jnp.float32(1.0), alpha]).reshape(2, *([1] * task.ndim))
    trimmed = jnp.stack([d * _top_magnitude_mask(d, density) for d in (task, safety)])
    weighted = weights * trimmed
    elected = jnp.sign(jnp.sum(weighted, axis=0))
    agree = (jnp.sign(weighted) == elected) & (elected != 0)
    divisor = jnp.sum(weights * agree, axis=0)
    merged = jnp.sum(weighted * agree, axis=0) / jnp.where(divisor == 0, 1.0, divisor)
    return merged, _stats(weight=alpha)


@register("dare", "drop each delta entry with probability 1 − density, rescale the kept by 1/density, then "
                  "θ_base + τ_task' + α·τ_safe' (DARE, Yu et al. 2024)",
          density=Option(0.5, "probability of keeping an entry", FRACTION, flag=True))
def dare(task, safety, alpha, key, *, density):
    keep_task, keep_safety = _bernoulli_masks(key, density, 2, task.shape)
    return (task * keep_task + alpha * safety * keep_safety) / density, _stats(weight=alpha)


_MASK_BITS = 16  # the most random bits spent on one Bernoulli draw


def _bernoulli_masks(key: jax.Array, p: float, count: int, shape: tuple[int, ...]) -> jax.Array:
    """`count` independent masks of `shape`, each entry kept with probability p, from as few random bits as that
    takes: an entry compares a field of b bits of `jax.random.bits` with round(p·2^b), where b is the smallest
    power of two with p·2^b whole (one bit for p = 1/2), at most 16 (then P(keep) is p to within 2^-17; jax's
    `bernoulli` spends 32 bits on every entry, and drawing them was most of a CPU DARE merge's time)."""
    width = next((b for b in (0, 1, 2, 4, 8) if (p * 2**b).is_integer()), _MASK_BITS)
    n = count * math.prod(shape)
    if width == 0:  # p = 1
        return jnp.ones((count, *shape), bool)
    per_word = 32 // width
    words = jax.random.bits(key, (-(-n // per_word),), jnp.uint32)
    fields = (words[:, None] >> (jnp.arange(per_word, dtype=jnp.uint32) * width)) & jnp.uint32(2**width - 1)
    return (fields.reshape(-1)[:n] < jnp.uint32(round(p * 2**width))).reshape(count, *shape)


@register("breadcrumbs", "drop each delta's largest `gamma` and smallest magnitudes, keeping `density`, then "
                         "θ_base + τ_task' + α·τ_safe' (Model Breadcrumbs, Davari & Belilovsky 2024)",
          density=Option(0.9, "fraction of entries kept per delta", FRACTION, flag=True),
          gamma=Option(0.01, "fraction of largest-magnitude outliers removed", Range(0, 1, high_open=True), flag=True))
def breadcrumbs(task, safety, alpha, key, *, density, gamma):
    kept_task = task * _top_magnitude_mask(task, density, gamma)
    kept_safety = safety * _top_magnitude_mask(safety, density, gamma)
    return kept_task + alpha * kept_safety, _stats(weight=alpha)


def _model_stock_host(alpha: np.float32, sums: Sums | None) -> tuple[Apply, dict[str, float]]:
    task_sq, safety_sq, dot = sums
    norms = np.sqrt(task_sq) * (float(alpha) * np.sqrt(safety_sq))  # ‖τ_task‖·‖α·τ_safe‖, α ≥ 0
    cos = np.float32(float(alpha) * dot / norms if norms > 0 else 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):  # cos = −1: t is −inf and the merged tensor is refused
        t = np.float32(2) * cos / (np.float32(1) + cos)

    def apply(task: np.ndarray, safety: np.ndarray) -> None:  # t·(τ_task + α·τ_safe)/2, as `model_stock`
        np.multiply(safety, alpha, out=safety)
        np.add(task, safety, out=safety)
        np.multiply(safety, t, out=safety)
        np.divide(safety, np.float32(2), out=safety)

    return apply, {"interference": NAN, "weight": float(t)}


@register("model_stock", "t = 2cosφ/(1 + cosφ) from the angle of τ_task and α·τ_safe per tensor; θ_base + "
                         "t·(τ_task + α·τ_safe)/2 (Model Stock, Jang et al. 2024)",
          host=HostForm(_model_stock_host, uses_sums=True))
def model_stock(task, safety, alpha, key):
    scaled = alpha * safety
    norms = jnp.linalg.norm(task.reshape(-1)) * jnp.linalg.norm(scaled.reshape(-1))
    cos = jnp.where(norms > 0, jnp.vdot(task, scaled) / jnp.where(norms > 0, norms, 1.0), 0.0)
    t = 2 * cos / (1 + cos)
    return t * (task + scaled) / 2, _stats(weight=t)


@register("tsv", "top `keep` singular triplets of τ_task and α·τ_safe stacked, U and V replaced by their orthogonal "
                 "polar factors, delta = U⊥ S V⊥ᵀ; other tensors averaged (TSV-Merge, Gargiulo et al. 2025)",
          keep=Option(0.5, "fraction of singular triplets kept per delta, 1/number of deltas", FRACTION, flag=True))
def tsv(task, safety, alpha, key, hints, *, keep):
    scaled = alpha * safety
    if task.ndim != 2:
        return (task + scaled) / 2, _stats()
    known = _known_triplets(hints, safety, alpha, keep)
    # Numerically zero triplets dropped (`significant`): their arbitrary singular vectors would steer the polar
    # factors, so a low-rank (LoRA) task would merge differently from its dense product.
    u1, s1, v1 = significant(top_triplets(task, keep, known=known.get("task")), task.shape)
    u2, s2, v2 = significant(top_triplets(scaled, keep, known=known.get("safety")), task.shape)
    u = polar(jnp.concatenate([u1, u2], axis=1))
    v = polar(jnp.concatenate([v1, v2], axis=1))
    return (u * jnp.concatenate([s1, s2])) @ v.T, _stats()


@register("safelora", "per matrix, C = V Vᵀ/‖V‖_F with V = τ_safe; if cos(τ_task, C τ_task) < threshold then "
                      "τ_task ← C τ_task; θ_base + τ_task (Safe LoRA, Hsu et al. 2024)", uses_alpha=False,
          threshold=Option(0.5, "similarity below which the task delta is projected (a cosine)", Range(-1, 1),
                           flag=True))
def safelora(task, safety, alpha, key, *, threshold):
    if task.ndim != 2:
        return task, _stats()
    norm_v = jnp.linalg.norm(safety)
    projected = safety @ (safety.T @ task) / jnp.where(norm_v > 0, norm_v, 1.0)  # C τ without forming C
    denom = jnp.linalg.norm(task) * jnp.linalg.norm(projected)
    cos = jnp.where(denom > 0, jnp.vdot(task, projected) / jnp.where(denom > 0, denom, 1.0), 1.0)
    return jnp.where(cos < threshold, projected, task), _stats(weight=cos)


def method_options(name: str, given: dict[str, Any]) -> dict[str, Any]:
    """The method's options with defaults filled in; unknown names, and values outside an option's declared range
    or choices, are an error naming the option."""
    if name not in METHODS:
        raise EnchtableError(f"unknown merge method {name!r}; available: {', '.join(METHODS)}")
    valid = METHODS[name].options
    unknown = sorted(set(given) - set(valid))
    if unknown:
        raise EnchtableError(f"method {name!r} has no option(s) {unknown}; its options: "
                             f"{', '.join(valid) if valid else 'none'}")
    return {k: o.check(k, given[k]) if k in given else o.default for k, o in valid.items()}


def flag_options() -> dict[str, dict[str, Option]]:
    """{option: {method: Option}} of the options declared with `flag=True`: one CLI flag per option name, shared by
    the methods that declare it, which must agree on its range and choices (the flag parses with them)."""
    shared: dict[str, dict[str, Option]] = {}
    for method in METHODS.values():
        for name, option in method.options.items():
            if option.flag:
                shared.setdefault(name, {})[method.name] = option
    for name, by_method in shared.items():
        if len({(o.range, o.choices) for o in by_method.values()}) != 1:
            raise AssertionError(f"merge methods declare option {name} with different ranges or choices: {by_method}")
    return shared
