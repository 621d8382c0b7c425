"""The CLI's defaults are the declared defaults: every merge-method option (merging/methods.py registry) and
every field of the options dataclasses reaches its command with the default it is declared with, and no flag
carries a default of its own.

The cases are generated from the declarations, so an option added to a method or a field added to an options
class is checked without editing this file; a field or option the CLI leaves out fails here."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest

from enchtable_jax.calibration import CalibrationOptions
from enchtable_jax.cli import _distill_options, _method_options, _options_from, build_parser
from enchtable_jax.distillation.train import DistillOptions
from enchtable_jax.merging.methods import METHODS, method_options
from enchtable_jax.options import GCGOptions, SafeDecodingOptions
from enchtable_jax.training.finetune import FinetuneOptions

REQUIRED = {"merge": [], "enchant": ["--base", "b", "--task", "t", "--out", "o"],
            "distill": ["--model", "m", "--data", "d", "--out", "o"],
            "finetune": ["--model", "m", "--data", "d", "--out", "o"], "eval": [],
            "attack": ["--model", "m", "--prompts", "p", "--out", "o"]}


def _by_flag(command: str) -> dict[str, argparse.Action]:
    """{flag: action} of one subcommand's parser."""
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    return {flag: a for a in sub._actions for flag in a.option_strings}


def _shown(default) -> str:
    """A default as --help writes it."""
    return f"{default:g}" if isinstance(default, (int, float)) else str(default)


METHOD_CASES = [(command, m, name) for command in ("merge", "enchant") for m in METHODS
                for name in METHODS[m].options]


def test_every_method_declares_options_or_none():
    """Not vacuous: the registry has options with and without flags."""
    flagged = [(m, n) for _, m, n in METHOD_CASES if METHODS[m].options[n].flag]
    assert len(METHOD_CASES) > 20 and 8 <= len(flagged) < len(METHOD_CASES)


@pytest.mark.parametrize("command,method,name", METHOD_CASES, ids=[f"{c}-{m}.{n}" for c, m, n in METHOD_CASES])
def test_method_option_default_on_the_command_line_is_the_declared_one(command, method, name):
    """Not given, an option resolves to its declared default; its flag (if declared with one) has no default of
    its own and its help names the method and that default; without a flag, --set reaches it."""
    option = METHODS[method].options[name]
    args = build_parser().parse_args([command, *REQUIRED[command], *(["--method", method] if command == "merge"
                                                                     else [])])
    assert method_options(method, _method_options(args))[name] == option.default
    if option.flag:
        flag = "--" + name.replace("_", "-")
        action = _by_flag(command)[flag]
        assert action.default in (None, False), f"{flag} has a default of its own: {action.default!r}"
        assert f"{method}: {option.help}" in action.help
        if not isinstance(option.default, bool):
            assert f"{method}: {option.help} (default {_shown(option.default)})" in action.help
        switch = isinstance(option.default, bool)
        value = [] if switch else [str(option.default)]
        args = build_parser().parse_args([command, *REQUIRED[command], flag, *value])
        assert _method_options(args)[name] == (True if switch else option.default)
    else:
        args = build_parser().parse_args([command, *REQUIRED[command],
                                          "--set", f"{name}={json.dumps(option.default)}"])
        assert method_options(method, _method_options(args))[name] == option.default


FIELD_CASES = [(command, cls, f.name) for command, cls in (("distill", DistillOptions), ("finetune", FinetuneOptions),
                                                          ("enchant", DistillOptions), ("merge", CalibrationOptions),
                                                          ("enchant", CalibrationOptions), ("attack", GCGOptions),
                                                          ("eval", SafeDecodingOptions))
               for f in dataclasses.fields(cls)]


def _read_back(command: str, cls: type, argv: list[str]):
    args = build_parser().parse_args([command, *REQUIRED[command], *argv])
    return _options_from(args, cls) if cls in (CalibrationOptions, GCGOptions, SafeDecodingOptions) else \
        _distill_options(args, cls)


def test_the_field_cases_cover_every_options_class():
    """Not vacuous: every training and calibration field, and both kinds of flag (a value, a switch)."""
    assert len(FIELD_CASES) > 60
    assert ("finetune", FinetuneOptions, "scope") in FIELD_CASES and ("distill", DistillOptions, "linearized") in \
        FIELD_CASES and ("merge", CalibrationOptions, "stop_early") in FIELD_CASES


@pytest.mark.parametrize("command,cls,name", FIELD_CASES, ids=[f"{c}-{k.__name__}.{n}" for c, k, n in FIELD_CASES])
def test_field_default_on_the_command_line_is_the_declared_one(command, cls, name):
    """Every field has a flag (unless declared API-only), whose default is the field's and whose help is the
    declared one; a bool field's switch flips it; the options read back from a bare command line are the class's
    defaults, so a field cannot be left out of the CLI or given another default there."""
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    assert "help" in field.metadata, f"{cls.__name__}.{name} is not declared with options.option"
    default = getattr(cls(), name)
    assert _read_back(command, cls, []) == cls()
    if not field.metadata["cli"]:  # API only: the command line leaves it at its default (checked above)
        return
    flag = "--distill-seed" if (command, name) == ("enchant", "seed") else \
        field.metadata["flag"] or "--" + name.replace("_", "-")
    action = _by_flag(command).get(flag)
    assert action is not None, f"{cls.__name__}.{name} has no flag {flag} in enchtable {command}"
    assert field.metadata["help"] in action.help
    if isinstance(default, bool):
        assert action.nargs == 0 and action.default is False
        assert getattr(_read_back(command, cls, [flag]), name) is (not default)
        return
    assert action.default == default, f"{flag} defaults to {action.default!r}, {cls.__name__}.{name} to {default!r}"
    if default is not None:
        assert f"(default {_shown(default)})" in action.help
