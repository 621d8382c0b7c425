"""Every range-declared option is refused outside its range, NaN included, with the same one-line message from
the API (EnchtableError) and the CLI (exit 2 at parse time), and accepted at its boundaries.

The cases are generated from the declarations (options dataclasses, the merge-method registry, options.py's
tables), so a new option is covered without editing this file; the hand-written cases below keep the test
from passing vacuously if the generation found nothing."""

from __future__ import annotations

import dataclasses
import math

import pytest

from enchtable_jax.calibration import CalibrationOptions
from enchtable_jax.cli import build_parser
from enchtable_jax.distillation.train import DistillOptions
from enchtable_jax.errors import EnchtableError
from enchtable_jax.eval.prompts import load_prompts
from enchtable_jax.merging.methods import MERGE_OPTIONS, METHODS, method_options
from enchtable_jax.options import (DEMO_OPTIONS, DISTRIBUTED_OPTIONS, EVAL_OPTIONS, INIT_OPTIONS, GCGOptions, Range,
                                   SafeDecodingOptions,
                                   check_values, field_ranges)
from enchtable_jax.training.finetune import FinetuneOptions

REQUIRED = {"distill": ["--model", "m", "--data", "d", "--out", "o"],
            "finetune": ["--model", "m", "--data", "d", "--out", "o"],
            "enchant": ["--base", "b", "--task", "t", "--out", "o"], "merge": [], "eval": [], "init": ["x"],
            "demo": ["--out", "o"], "attack": ["--model", "m", "--prompts", "p", "--out", "o"]}
RENAMED = {("enchant", "seed"): "--distill-seed", ("merge", "limit"): "--calibrate-limit",
           ("merge", "max_new_tokens"): "--calibrate-max-new-tokens"}


def bad_values(r: Range) -> list:
    """Values just outside the range (or on an open bound), NaN, infinities, and a fraction for integers."""
    out = [math.nan, math.inf, -math.inf]
    if r.low is not None:
        out.append(r.low if r.low_open else r.low - (1 if r.integer else 1e-6))
    if r.high is not None:
        out.append(r.high if r.high_open else r.high + (1 if r.integer else 1e-6))
    if r.integer:
        out.append((r.low or 0) + 1.5)
    if r.integer and r.high is not None:
        out.append(2**64)  # beyond every fixed-width integer: refused, not an OverflowError
    return out


def good_values(r: Range) -> list:
    """The closed bounds themselves, and a value just inside an open bound."""
    out = []
    if r.low is not None:
        out.append(r.low + (1 if r.integer else 1e-6) if r.low_open else r.low)
    if r.high is not None:
        out.append(r.high - (1 if r.integer else 1e-6) if r.high_open else r.high)
    if r.low is None and r.high is None:
        out.append(0)
    return [int(v) if r.integer else float(v) for v in out]


# (label, API check taking (name, value), {command: flag}, name, Range), one per declared option
def _declared():
    rows = []
    for cls, command in ((DistillOptions, "distill"), (FinetuneOptions, "finetune"), (DistillOptions, "enchant")):
        for name, r in field_ranges(cls).items():
            rows.append((f"{cls.__name__}.{name}", lambda n, v, cls=cls: cls(**{n: v}), command, name, r))
    for cls, command in ((GCGOptions, "attack"), (SafeDecodingOptions, "eval")):
        for name, r in field_ranges(cls).items():
            rows.append((f"{cls.__name__}.{name}", lambda n, v, cls=cls: cls(**{n: v}), command, name, r))
    for name, r in field_ranges(CalibrationOptions).items():
        if name in ("batch_size",):  # no flag: API only
            rows.append((f"CalibrationOptions.{name}", lambda n, v: CalibrationOptions(**{n: v}), None, name, r))
            continue
        rows.append((f"CalibrationOptions.{name}", lambda n, v: CalibrationOptions(**{n: v}), "merge", name, r))
    for method in METHODS.values():
        for name, option in method.options.items():
            if option.range is not None:
                command = "merge" if option.flag else None
                rows.append((f"{method.name}.{name}", lambda n, v, m=method.name: method_options(m, {n: v}), command,
                             name, option.range))
    for name, r in MERGE_OPTIONS.items():
        rows.append((f"merge.{name}", lambda n, v: check_values(MERGE_OPTIONS, **{n: v}), "merge", name, r))
    for table, command in ((EVAL_OPTIONS, "eval"), (INIT_OPTIONS, "init"), (DEMO_OPTIONS, "demo"),
                           (DISTRIBUTED_OPTIONS, "distill")):
        for name, r in table.items():
            rows.append((f"{command}.{name}", lambda n, v, t=table: check_values(t, **{n: v}), command, name, r))
    return rows


DECLARED = _declared()
BAD = [(label, api, cmd, name, v) for label, api, cmd, name, r in DECLARED for v in bad_values(r)]
GOOD = [(label, api, cmd, name, v) for label, api, cmd, name, r in DECLARED for v in good_values(r)]


def test_the_declarations_cover_the_options_of_the_issue():
    """Not vacuous: the options named in issue 15, and each option class, are among the declared ones."""
    labels = {label for label, *_ in DECLARED}
    for label in ("merge.beta", "merge.alpha", "DistillOptions.max_grad_norm", "enchtable.keep", "tsv.keep",
                  "dare.density", "ties.density", "breadcrumbs.gamma", "safelora.threshold", "DistillOptions.steps",
                  "FinetuneOptions.steps", "eval.limit", "CalibrationOptions.unsafe_tolerance", "GCGOptions.topk",
                  "GCGOptions.time_budget", "SafeDecodingOptions.alpha", "SafeDecodingOptions.first_m"):
        assert label in labels, label
    assert len(BAD) > 150 and len(GOOD) > 50


def _flag(command: str, name: str) -> str:
    declared = {f.name: f.metadata["flag"] for f in dataclasses.fields(SafeDecodingOptions)} if command == "eval" else {}
    return RENAMED.get((command, name)) or declared.get(name) or "--" + name.replace("_", "-")


@pytest.mark.parametrize("label,api,command,name,value", BAD, ids=[f"{b[0]}={b[4]}" for b in BAD])
def test_out_of_range_is_refused_by_api_and_cli(label, api, command, name, value, capsys):
    with pytest.raises(EnchtableError, match=f"^option {name} must be .*, got ") as err:
        api(name, value)
    assert "\n" not in str(err.value)
    if command is None:
        return
    flag = _flag(command, name)
    text = str(int(value)) if isinstance(value, float) and value.is_integer() else repr(value)
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([command, *REQUIRED[command], f"{flag}={text}"])
    assert exc.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"argument {flag}: must be" in last and ", got " in last, last
    # the CLI states the same range as the API
    assert str(err.value).split(" must be ")[1].split(", got")[0] in last


@pytest.mark.parametrize("label,api,command,name,value", GOOD, ids=[f"{g[0]}={g[4]}" for g in GOOD])
def test_boundary_values_are_accepted(label, api, command, name, value):
    api(name, value)
    if command is not None:
        args = build_parser().parse_args([command, *REQUIRED[command], f"{_flag(command, name)}={value}"])
        dest = {"--distill-seed": "distill_seed", **{f.metadata["flag"]: f.metadata["flag"][2:].replace("-", "_")
                                                      for f in dataclasses.fields(SafeDecodingOptions)}, "--calibrate-limit": "calibrate_limit",
                "--calibrate-max-new-tokens": "calibrate_max_new_tokens"}.get(_flag(command, name), name)
        if command in ("distill", "finetune") and name == "seed":
            dest = "distill_seed"
        assert getattr(args, dest) == value


def test_every_numeric_flag_has_a_range_in_help(capsys):
    """No numeric flag escapes: every type=int/float flag of every command parses through a Range."""
    commands = build_parser()._subparsers._group_actions[0].choices
    ranged = 0
    for command, p in commands.items():
        for action in p._actions:
            assert action.type not in (int, float), f"{command} {action.option_strings}: no declared range"
            if getattr(action.type, "__module__", None) == "enchtable_jax.options":
                ranged += 1
                assert "[range: " in action.help, (command, action.option_strings)
    assert ranged > 40


# Hand-written: the examples of issue 15, through the real entry points.
@pytest.mark.parametrize("argv,flag", [
    (["merge", "--beta", "-1"], "--beta"),
    (["merge", "--alpha", "nan"], "--alpha"),
    (["merge", "--keep", "0"], "--keep"),
    (["merge", "--keep", "1.5"], "--keep"),
    (["merge", "--density", "2"], "--density"),
    (["merge", "--gamma", "2"], "--gamma"),
    (["merge", "--threshold", "nan"], "--threshold"),
    (["finetune", *REQUIRED["finetune"], "--max-grad-norm", "-1"], "--max-grad-norm"),
    (["distill", *REQUIRED["distill"], "--steps", "-3"], "--steps"),
    (["eval", "--limit", "-1"], "--limit"),
    (["merge", "--calibrate-grid", "0.1,nan"], "--calibrate-grid"),
    (["convert", "a", "b", "--shard-size", "0"], "--shard-size"),
])
def test_issue_examples_exit_2_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2
    assert f"argument {flag}:" in capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("argv", [
    ["eval", "--temperature", "1", "--seed", "18446744073709551616"],
    ["merge", "--method", "dare", "--seed", "18446744073709551616"],
    ["init", "x", "--seed", "18446744073709551616"],
    ["init", "x", "--seed", "1" * 400],
    ["demo", "--out", "o", "--seed", "4294967296"],
    ["distill", *REQUIRED["distill"], "--seed", "18446744073709551616"],
    ["enchant", *REQUIRED["enchant"], "--distill-seed", "18446744073709551616"],
    ["demo", "--out", "o", "--seeds", "0-99999999999"],
    ["demo", "--out", "o", "--seeds", "0-100000"],
    ["demo", "--out", "o", "--seeds", "0-100"],
    ["demo", "--out", "o", "--seeds", "0-60,100-160"],
    ["demo", "--out", "o", "--seeds", "4294967295-4294967296"],
    ["demo", "--out", "o", "--seeds", "5-1"],
    ["demo", "--out", "o", "--seeds", "0,0"],
])
def test_huge_seeds_and_too_many_seeds_exit_2_at_parse_time(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


def test_seed_range_is_declared_once_and_used_by_every_api():
    from enchtable_jax.demo import run_demo
    from enchtable_jax.models.init import init_params, preset_config
    from enchtable_jax.options import MAX_SEEDS, SEED, parse_seeds

    assert SEED == Range(0, 2**32 - 1, integer=True)
    for table in (EVAL_OPTIONS, INIT_OPTIONS, DEMO_OPTIONS, MERGE_OPTIONS):
        assert table["seed"] is SEED
    for cls in (DistillOptions, FinetuneOptions):
        assert field_ranges(cls)["seed"] is SEED
    assert parse_seeds("0-2,9") == [0, 1, 2, 9] and len(parse_seeds(f"0-{MAX_SEEDS - 1}")) == MAX_SEEDS
    assert parse_seeds("4294967295") == [4294967295]
    with pytest.raises(EnchtableError, match="option seed must be an integer in \\[0, 4294967295\\]"):
        init_params(preset_config("tiny"), seed=2**64)
    with pytest.raises(EnchtableError, match="option seed must be"):
        run_demo("unused-out", seed=2**64)
    with pytest.raises(EnchtableError, match=f"1 to {MAX_SEEDS} seeds"):
        run_demo("unused-out", seeds=range(10**12))
    with pytest.raises(EnchtableError, match="option seeds must be"):
        run_demo("unused-out", seeds=[0, -1])


@pytest.mark.parametrize("argv", [
    ["merge", "--beta", "-1"],
    ["merge", "--seed", "18446744073709551616"],
    ["eval", "--limit", "-1"],
    ["demo", "--out", "o", "--seeds", "0-100000"],
    ["distill", "--model", "m"],  # a required option missing
    ["merge", "--no-such-flag"],
    ["nosuchcommand"],
    [],
])
def test_parse_errors_are_one_line(argv, capsys):
    """Not argparse's multi-line usage: one line `enchtable CMD: error: ...`, exit 2."""
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("enchtable") and ": error: " in lines[0], err
    if argv and argv[0] in ("merge", "eval", "demo", "distill") and "--no-such-flag" not in argv:
        assert lines[0].startswith(f"enchtable {argv[0]}: error: "), err


@pytest.mark.parametrize("argv,needles", [
    (["merge", "--method", "task_arithmetic", "--alpha", "1", "--beta", "1"], ["--alpha", "--beta", "not both"]),
    (["merge", "--method", "enchtable", "--alpha", "0", "--beta", "0.1"], ["--alpha", "--beta", "not both"]),
    (["merge", "--method", "safelora", "--alpha", "0.5"], ["--alpha", "safelora"]),
    (["merge", "--method", "safelora", "--beta", "0.5"], ["--beta", "safelora"]),
    (["enchant", "--alpha", "1", "--beta", "1", "--safety-vector", "v"], ["--alpha", "--beta", "not both"]),
    (["eval", "--labels", "labels.csv", "--model", "m", "--prompts", "p.json"], ["--labels", "--judge-report"]),
    (["merge", "--method", "enchtable", "--learnable", "--set", "steps=100000000"], ["steps", "10000"]),
])
def test_ignored_or_unbounded_options_are_refused_before_any_work(argv, needles, tmp_path, capsys):
    from enchtable_jax.cli import main

    required = {"merge": ["--base", tmp_path / "b", "--task", tmp_path / "t", "--safety-vector", tmp_path / "v"],
                "enchant": ["--base", tmp_path / "b", "--task", tmp_path / "t"], "eval": []}[argv[0]]
    code = main([str(a) for a in [*argv, *required, "--out", tmp_path / "o"]])  # no input exists: refused first
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not (tmp_path / "o").exists()


def test_api_refuses_alpha_with_beta_and_alpha_for_a_method_without_it():
    from enchtable_jax.merging.pipeline import merge
    from enchtable_jax.workflow import check_merge_options

    with pytest.raises(EnchtableError, match="options alpha and beta exclude each other"):
        merge("task_arithmetic", "unused-base", "unused-task", safety_vector="unused", alpha=1.0, beta=0.1)
    with pytest.raises(EnchtableError, match="option alpha does not apply to method safelora"):
        merge("safelora", "unused-base", "unused-task", safety_vector="unused", alpha=0.5)
    with pytest.raises(EnchtableError, match="options alpha and beta exclude each other"):
        check_merge_options("enchtable", {"alpha": 1.0, "beta": 0.1})
    assert [m.name for m in METHODS.values() if not m.uses_alpha] == ["safelora"]


def test_api_examples_raise_the_same_error():
    with pytest.raises(EnchtableError, match=r"option beta must be non-negative \(>= 0\), got -1"):
        check_values(MERGE_OPTIONS, beta=-1)
    with pytest.raises(EnchtableError, match="option max_grad_norm must be positive, got -1"):
        FinetuneOptions(max_grad_norm=-1)
    with pytest.raises(EnchtableError, match=r"option density must be in \(0, 1\], got 2"):
        method_options("dare", {"density": 2})
    with pytest.raises(EnchtableError, match="option threshold must be in \\[-1, 1\\], got nan"):
        method_options("safelora", {"threshold": math.nan})
    with pytest.raises(EnchtableError, match="option limit must be positive"):
        load_prompts("unused.json", limit=-1)  # refused before the file is read
    with pytest.raises(EnchtableError, match="option solver must be one of 'auto', 'svd', 'gram64', 'gram'"):
        method_options("enchtable", {"solver": "qr"})
    assert dataclasses.replace(DistillOptions(), steps=1).steps == 1
