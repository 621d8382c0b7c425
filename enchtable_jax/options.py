"""Options declared once, as data: each with its default, valid values and help, used by the Python API and the CLI.

A field of an options dataclass is declared with `option(default, help, Range(...))`: the `Range` is checked by
`check_fields` in `__post_init__`, and the CLI builds the field's flag (name, type, default, range, help) from the
declaration. Merge-method options are declared the same way in the registry (`methods.Option`), and the few command
options that have no dataclass in the tables below. The CLI builds each numeric flag's `type=` from the same
`Range` (`Range.arg_type`), so `beta=-1` from Python and `--beta -1` on the command line are refused with the same
sentence. NaN and infinities are never in a range: no option value may turn a model into NaN.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
from typing import Any

from enchtable_jax.errors import EnchtableError


@dataclasses.dataclass(frozen=True)
class Range:
    """An interval of finite numbers (`integer`: whole numbers only); `None` bounds are open-ended.

    `low_open` / `high_open` exclude the bound itself: Range(0, 1, low_open=True) is (0, 1].
    `optional`: None is also accepted (the option's "not given").
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    optional: bool = False

    def text(self) -> str:
        """The range as written in messages and --help: 'in [0, 1]', 'in (0, 1]', 'positive', 'an integer >= 0'."""
        if self.low is not None and self.high is not None:
            interval = (f"{'(' if self.low_open else '['}{_num(self.low)}, {_num(self.high)}"
                        f"{')' if self.high_open else ']'}")
            return f"an integer in {interval}" if self.integer else f"in {interval}"
        if self.low is not None:
            if self.low == 0 and self.low_open and not self.integer:
                return "positive"
            if self.integer and (self.low == 1 or self.low == 0 and self.low_open):
                return "positive (an integer >= 1)"
            bound = f"{'>' if self.low_open else '>='} {_num(self.low)}"
            if self.low == 0:
                return f"non-negative ({'an integer ' if self.integer else ''}{bound})"
            return f"{'an integer' if self.integer else 'a number'} {bound}"
        if self.high is not None:
            return f"{'an integer' if self.integer else 'a number'} {'<' if self.high_open else '<='} {_num(self.high)}"
        return "an integer" if self.integer else "a finite number"

    def contains(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) and not _is_numpy_number(value):
            return False
        if isinstance(value, int) or _is_numpy_number(value) and isinstance(value.item(), int):
            value = int(value)  # exact: 2**64 and 10**400 are compared, not converted to float (OverflowError)
        elif self.integer and not float(value).is_integer():
            return False
        else:
            value = float(value)
            if not math.isfinite(value):
                return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))

    def check(self, name: str, value: Any) -> Any:
        """`value` if it is in the range, else an EnchtableError naming the option and the range."""
        if value is None and self.optional:
            return value
        if not self.contains(value):
            raise EnchtableError(f"option {name} must be {self.text()}, got {value!r}")
        return value

    def arg_type(self, flag: str):
        """An argparse `type=`: parse the text as int or float, then check the range (argparse exits 2)."""

        def parse(text: str):
            try:
                value = int(text) if self.integer else float(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"must be {self.text()}, got {text!r}") from None
            if not self.contains(value):
                raise argparse.ArgumentTypeError(f"must be {self.text()}, got {text!r}")
            return value

        parse.__name__ = flag.lstrip("-").replace("-", "_")  # argparse names the type in some messages
        return parse

    def short(self) -> str:
        """The range in symbols: '[0, 1]', '(0, 1]', '> 0', 'integer >= 1'."""
        if self.low is not None and self.high is not None:
            interval = (f"{'(' if self.low_open else '['}{_num(self.low)}, {_num(self.high)}"
                        f"{')' if self.high_open else ']'}")
        elif self.low is not None:
            interval = f"{'>' if self.low_open else '>='} {_num(self.low)}"
        elif self.high is not None:
            interval = f"{'<' if self.high_open else '<='} {_num(self.high)}"
        else:
            interval = "finite"
        return f"integer {interval}" if self.integer else interval

    def help(self, text: str | None = None) -> str:
        """`text` followed by the range, for --help."""
        return f"{text + ' ' if text else ''}[range: {self.short()}]"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _is_numpy_number(value: Any) -> bool:
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency
        return False
    return isinstance(value, (np.integer, np.floating))


# Ranges used more than once.
POSITIVE = Range(0, low_open=True)  # > 0, finite
NON_NEGATIVE = Range(0)  # >= 0, finite
COUNT = Range(1, integer=True)  # 1, 2, ...
OPTIONAL_COUNT = Range(1, integer=True, optional=True)
SEED = Range(0, 2**32 - 1, integer=True)  # every seed option and API: JAX and NumPy keys take 32 bits
MAX_SEEDS = 100  # `demo --seeds`: at most this many runs
FRACTION = Range(0, 1, low_open=True)  # (0, 1]
RATE = Range(0, 1)  # [0, 1]


def option(default: Any, help: str, range_: Range | None = None, *, choices: tuple | None = None,
           flag: str | None = None, metavar: str | None = None, cli: bool = True) -> Any:
    """A dataclass field declared with everything its command-line flag needs: `default`, one line of `help`, its
    valid values (`range_`, checked by `check_fields`; or `choices`), the flag's spelling when it is not
    --FIELD-NAME (for a bool: the switch that flips the default, `help` saying what it does), and `cli=False` for a
    field only the Python API sets. None, an optional field's "not given", is accepted whatever the choices."""
    metadata = {"help": help, "cli": cli, "flag": flag, "metavar": metavar, "choices": choices}
    if range_ is not None:
        metadata["range"] = range_
    return dataclasses.field(default=default, metadata=metadata)


def with_default(cls: type, name: str, default: Any) -> Any:
    """Field `name` of the options dataclass `cls` with another default (a subclass's), its declaration kept."""
    declared = next(f for f in dataclasses.fields(cls) if f.name == name)
    return dataclasses.field(default=default, metadata=declared.metadata)


def field_ranges(cls_or_instance: Any) -> dict[str, Range]:
    """{field name: Range} of a dataclass's range-declared fields."""
    return {f.name: f.metadata["range"] for f in dataclasses.fields(cls_or_instance) if "range" in f.metadata}


def check_fields(instance: Any) -> None:
    """Check every range- or choice-declared field of a dataclass instance (call from `__post_init__`)."""
    for name, range_ in field_ranges(instance).items():
        range_.check(name, getattr(instance, name))
    for f in dataclasses.fields(instance):
        choices, value = f.metadata.get("choices"), getattr(instance, f.name)
        if choices is not None and value is not None and value not in choices:
            raise EnchtableError(f"option {f.name} must be {', '.join(choices[:-1])} or {choices[-1]}, got {value!r}")


def check_values(ranges: dict[str, Range], **values: Any) -> None:
    """Check keyword values against `ranges` (names without a range are not checked)."""
    for name, value in values.items():
        if name in ranges:
            ranges[name].check(name, value)


@dataclasses.dataclass(frozen=True)
class SafeDecodingOptions:
    """SafeDecoding's parameters (Xu et al. 2024, ACL, arXiv:2402.08983), defaults from its paper and reference
    code: α = 3, m = 2, c = 5 (eval/defenses.py applies them)."""

    alpha: float = option(3.0, "SafeDecoding: weight α of the expert's shift, p_base + α(p_expert - p_base)",
                          NON_NEGATIVE, flag="--safedecoding-alpha")
    first_m: int = option(2, "SafeDecoding: new tokens decoded with the expert (m); the rest by the model alone",
                          COUNT, flag="--safedecoding-first-m")
    common_tokens: int = option(5, "SafeDecoding: tokens the sample space holds at least (c), the smallest top-k "
                                   "of both models sharing that many", COUNT, flag="--safedecoding-common-tokens")

    def __post_init__(self):
        check_fields(self)


# Command options that have no dataclass: defaults and ranges, used by the functions and the CLI alike.
EVAL_OPTIONS = {
    "max_new_tokens": COUNT,
    "limit": OPTIONAL_COUNT,
    "limit_templates": OPTIONAL_COUNT,  # eval --jailbreak-templates: the first N templates
    "batch_size": COUNT,
    "temperature": NON_NEGATIVE,
    "top_p": FRACTION,
    "seed": SEED,
    "timeout": POSITIVE,
}
DISTRIBUTED_OPTIONS = {
    "num_processes": OPTIONAL_COUNT,
    "process_id": Range(0, integer=True, optional=True),
    "init_timeout": COUNT,
}
INIT_OPTIONS = {"seed": SEED}
DEMO_OPTIONS = {"seed": SEED}


def check_seeds(seeds: Any, name: str = "seeds") -> list[int]:
    """A list of distinct seeds, each in SEED, at most MAX_SEEDS of them; else an EnchtableError naming `name`."""
    count = len(seeds) if hasattr(seeds, "__len__") else None
    seeds = list(itertools.islice(seeds, MAX_SEEDS + 1))  # range(10**12) is not expanded
    if not seeds or len(seeds) > MAX_SEEDS:
        raise EnchtableError(f"option {name} must name 1 to {MAX_SEEDS} seeds, got "
                             f"{count if count is not None else 'more'}")
    for seed in seeds:
        SEED.check(name, seed)
    if len(set(seeds)) != len(seeds):
        raise EnchtableError(f"option {name} must name distinct seeds, got {seeds}")
    return [int(s) for s in seeds]


def parse_seeds(text: str, flag: str = "--seeds") -> list[int]:
    """`0-4` or `0,2,7` (or a mix: `0-2,9`) as a checked list of seeds (see check_seeds); a range is measured
    before it is expanded, so `0-99999999999` is refused at once instead of filling memory."""
    seeds: list[int] = []
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        try:
            low, high = (int(first), int(last)) if dash else (int(first), int(first))
        except ValueError:
            raise EnchtableError(f"{flag} expects ranges and numbers like 0-4 or 0,2,7, got {text!r:.100}") from None
        for bound in (low, high):
            if not SEED.contains(bound):
                raise EnchtableError(f"{flag} seeds must each be {SEED.text()}, got {bound}")
        if high < low:
            raise EnchtableError(f"{flag} range {part.strip()!r} is empty (the first seed is above the last)")
        if len(seeds) + high - low + 1 > MAX_SEEDS:
            raise EnchtableError(f"{flag} must name at most {MAX_SEEDS} seeds, got {text!r:.100}")
        seeds += range(low, high + 1)
    return check_seeds(seeds, flag)


@dataclasses.dataclass(frozen=True)
class GCGOptions:
    """The greedy coordinate gradient attack's settings (`enchtable attack --method gcg`, attack/gcg.py); the
    defaults of steps, topk, batch and suffix_length are the paper's (Zou et al. 2023)."""

    steps: int = option(500, "optimisation steps per prompt (the step budget)", COUNT)
    topk: int = option(256, "candidate tokens per suffix position, by the gradient", COUNT)
    batch: int = option(512, "candidate suffixes evaluated per step", COUNT)
    suffix_length: int = option(20, "suffix tokens, initialised as the paper's '! ! ! ...'", COUNT)
    target: str = option("Sure, here is", "the answer opening whose likelihood the suffix maximises")
    time_budget: float | None = option(None, "seconds of search per prompt (stops after the step that passes it)",
                                       Range(0, low_open=True, optional=True))
    seed: int = option(0, "seed of the candidate sampling", SEED)
    max_new_tokens: int = option(128, "tokens generated for the judged answer after the search", COUNT)

    def __post_init__(self):
        check_fields(self)  # the ranges declared above; the CLI's flags use the same ones
        if not isinstance(self.target, str) or not self.target.strip():
            raise EnchtableError(f"option target must be a non-empty string, got {self.target!r}")
