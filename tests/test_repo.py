"""The repository's promises about itself: CI runs exactly the README's test command, and proves its first."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    spec = importlib.util.spec_from_file_location("readme_command", ROOT / ".ci" / "readme_command.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.readme_commands()


def _ci_lines() -> list[str]:
    return [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]


def test_ci_runs_the_readme_test_command():
    commands = _readme_commands()
    assert len(commands) == 2, commands
    assert "pytest" in commands[1]
    assert commands[1] in _ci_lines()


def test_ci_runs_the_readme_first_command_on_the_plain_install():
    first = _readme_commands()[0]
    assert first.startswith("pip install -e . && enchtable demo"), first
    assert "bash .ci/smoke" in _ci_lines()
    smoke = [line.split("#")[0] for line in (ROOT / ".ci" / "smoke").read_text().splitlines()]
    assert any("readme_command.py first" in line for line in smoke)
    installs = [line.strip() for line in smoke if "pip install" in line]
    assert installs == ["python -m pip install --quiet --upgrade pip"], installs  # nothing beyond the command
