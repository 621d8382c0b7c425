"""The CLI's defaults are the declared defaults: every merge-method option (merging/methods.py registry) and
every field of the options dataclasses reaches its command with the default it is declared with, and no flag
carries a default of its own.

The cases are generated from the declarations, so an option added to a method or a field added to an options
class is checked without editing this file; a field or option the CLI leaves out fails here."""

from __future__ import annotations

import argparse
import json

import pytest

from enchtable_jax.cli import _method_options, build_parser
from enchtable_jax.merging.methods import METHODS, method_options

REQUIRED = {"merge": [], "enchant": ["--base", "b", "--task", "t", "--out", "o"]}


def _actions(command: str) -> dict[str, argparse.Action]:
    """{dest: action} of one subcommand's parser."""
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    return {a.dest: a for a in sub._actions}


def _flag(action: argparse.Action) -> str:
    return action.option_strings[-1]


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
    actions = _actions(command)
    if option.flag:
        action = actions[name]
        assert action.default in (None, False), f"{_flag(action)} has a default of its own: {action.default!r}"
        assert f"{method}: {option.help}" in action.help
        if not isinstance(option.default, bool):
            assert f"{method}: {option.help} (default {option.default:g})" in action.help
        given = "--" + name.replace("_", "-")
        value = [] if isinstance(option.default, bool) else [str(option.default)]
        args = build_parser().parse_args([command, *REQUIRED[command], given, *value])
        assert _method_options(args)[name] == (True if isinstance(option.default, bool) else option.default)
    else:
        args = build_parser().parse_args([command, *REQUIRED[command],
                                          "--set", f"{name}={json.dumps(option.default)}"])
        assert method_options(method, _method_options(args))[name] == option.default
