"""Scopes: which sub-networks are linearized (and trained) during distillation.

A scope is a set of *units*, sub-networks named like the forward pass names them
("model.layers.3.mlp", "model.layers.3.self_attn", "model.layers.3.self_attn.q_proj"); its
parameters are the HF tensors under those names. Each unit is linearized on its own around θ0 with
its actual input (the prototype's per-module linearization); the `model` scope linearizes the whole
backbone at once, and `all` the whole network, embeddings and head included (plain fine-tuning's
default). Scopes combine with '+', e.g. "attn_block+ffn".

The unit names here are a selection of those the forward passes to its seam (`models.transformer.Unit`),
which stays their one source: the linearized forward refuses, when it is traced, a scope naming a unit
the forward never reached (`check_reached`), since such a unit would train nothing.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Collection

from enchtable_jax.models.config import ModelConfig
from enchtable_jax.models.tensors import expected_shapes, layer_prefix
from enchtable_jax.errors import EnchtableError

# scope name -> unit name suffixes inside each selected layer. `model` and `all` are global scopes.
UNITS: dict[str, tuple[str, ...]] = {
    "ffn": ("mlp",),
    "attn": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
    "attn_block": ("self_attn",),
    "attn_ffn": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp"),
    "model": (),
    "all": (),
}
WHOLE = ("model", "all")  # scopes taken as one unit: the network itself
SCOPE_HELP = {
    "ffn": "each layer's MLP block (gate/up/down and activation) as one unit",
    "attn": "q/k/v/o projections one by one (linear in their weights: equals plain fine-tuning)",
    "attn_block": "each layer's whole attention block (projections, RoPE, softmax) as one unit",
    "attn_ffn": "attn and ffn together (the prototype's choice)",
    "model": "the whole backbone (all decoder layers and the final norm) linearized at once",
    "all": "every tensor: embeddings, decoder layers, final norm and head (with layers: only those decoder layers, "
           "plus embeddings, final norm and head)",
}


class ScopeError(EnchtableError):
    """An unknown scope, a bad layer range, or a selection with no parameters."""


@dataclasses.dataclass(frozen=True)
class Scope:
    """A resolved scope: the units to linearize and the tensor names they own (in HF order)."""

    name: str
    units: tuple[str, ...]
    params: tuple[str, ...]
    whole_model: bool = False


def parse_layers(layers: str | None, num_layers: int) -> range:
    """Python-slice layer selection: '12:-12', '3:', ':4', '5' (one layer), None (all)."""
    if layers is None or str(layers).strip() in ("", ":"):
        return range(num_layers)
    text = str(layers).strip()
    try:
        if ":" not in text:
            i = int(text)
            i = i + num_layers if i < 0 else i
            if not 0 <= i < num_layers:
                raise IndexError
            return range(i, i + 1)
        start, stop = (int(p) if p.strip() else None for p in text.split(":", 1))
    except (ValueError, IndexError):
        raise ScopeError(f"layer range {layers!r} not understood for a {num_layers}-layer model; use a Python "
                         "slice such as '12:-12', '4:', ':8' or a single index") from None
    return range(num_layers)[slice(start, stop)]


def resolve_scope(config: ModelConfig, scope: str, layers: str | None = None) -> Scope:
    """Resolve a scope name (or 'a+b') and an optional layer range against a model config."""
    names = [s.strip() for s in scope.split("+")]
    unknown = [s for s in names if s not in UNITS]
    if unknown or not names:
        valid = "; ".join(f"{k}: {v}" for k, v in SCOPE_HELP.items())
        raise ScopeError(f"unknown scope {unknown[0] if unknown else scope!r}; valid scopes ('a+b' combines "
                         f"them): {valid}")
    selected = parse_layers(layers, config.num_hidden_layers)
    all_names = list(expected_shapes(config))
    whole = [s for s in names if s in WHOLE]
    if whole:
        if len(names) > 1:
            covers = "the whole backbone" if whole[0] == "model" else "every tensor"
            raise ScopeError(f"scope {whole[0]!r} already covers {covers}; do not combine it with others")
        prefixes = tuple(layer_prefix(i) for i in selected)
        if whole[0] == "all":
            params = tuple(n for n in all_names if n.startswith(prefixes) or not n.startswith("model.layers."))
        else:
            params = tuple(n for n in all_names if n.startswith(prefixes)
                           or (n == "model.norm.weight" and len(selected) == config.num_hidden_layers))
        units: tuple[str, ...] = ()
    else:
        suffixes = list(dict.fromkeys(s for name in names for s in UNITS[name]))
        units = tuple(layer_prefix(i) + s for i in selected for s in suffixes)
        nested = [u for u in units if any(u != v and u.startswith(v + ".") for v in units)]
        if nested:
            raise ScopeError(f"scope {scope!r} nests units ({nested[0]} inside its attention block); pick one of "
                             "'attn' and 'attn_block'")
        params = tuple(n for n in all_names if n.startswith(tuple(u + "." for u in units)))
    if not params:
        raise ScopeError(f"scope {scope!r} with layers {layers!r} selects no parameters of this "
                         f"{config.num_hidden_layers}-layer model; valid scopes: {', '.join(UNITS)}; "
                         "layers is a Python slice such as '12:-12'")
    return Scope(name=scope if layers is None else f"{scope}@{layers}", units=units, params=params,
                 whole_model=bool(whole))


def unit_params(scope: Scope) -> dict[str, tuple[str, ...]]:
    """For each unit of the scope, the tensor names it owns."""
    return {u: tuple(n for n in scope.params if n.startswith(u + ".")) for u in scope.units}


def check_reached(scope: Scope, reached: Collection[str]) -> None:
    """Refuse a scope with a unit the forward never passed to its seam (`reached`, recorded while tracing):
    its tensors would get no gradient and the safety vector would be zero there."""
    missing = [u for u in scope.units if u not in reached]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        per_layer = sorted({re.sub(r"^model\.layers\.\d+\.", "", name) for name in reached})
        raise ScopeError(f"scope {scope.name!r} names unit(s) {', '.join(missing[:5])}{more} that the forward never "
                         f"passes to its seam, so they would train nothing; the forward's units are "
                         f"model.layers.N.{{{', '.join(per_layer)}}}")
