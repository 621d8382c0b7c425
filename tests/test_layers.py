"""The package's layering holds: the import-linter contracts in pyproject.toml ([tool.importlinter], the table in
DESIGN.md "Package layout") are kept, and they do break when a module imports upwards or across the stages."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = "Imports point down the layers"
STAGES = "The stages stand side by side"


def lint(root: Path) -> subprocess.CompletedProcess:
    """`lint-imports` with this repository's contracts on the `enchtable_jax` found under `root`."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                           "sys.exit(lint_imports_command())", "--config", str(ROOT / "pyproject.toml"),
                           "--no-cache", "--no-logo"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)


def test_the_package_keeps_its_layers():
    done = lint(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 kept, 0 broken" in done.stdout, done.stdout


@pytest.mark.parametrize("module, line, broken", [
    ("models/config.py", "from enchtable_jax import workflow", [LAYERS]),  # upwards
    ("eval/metrics.py", "from enchtable_jax.distillation import train", [STAGES]),  # across the stages
    ("errors.py", "import enchtable_jax.safe_io", [LAYERS]),  # the ground floor's own order
])
def test_the_contracts_break_on_a_wrong_import(tmp_path, module, line, broken):
    """A copy of the package with one wrong import fails the same check, naming the import."""
    shutil.copytree(ROOT / "enchtable_jax", tmp_path / "enchtable_jax", ignore=shutil.ignore_patterns("__pycache__"))
    with open(tmp_path / "enchtable_jax" / module, "a", encoding="utf-8") as f:
        f.write(f"\n{line}\n")
    done = lint(tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    importer = "enchtable_jax." + module.removesuffix(".py").replace("/", ".")
    assert importer in done.stdout, done.stdout
    report = done.stdout.split("Broken contracts")[-1]
    assert all(name in report for name in broken), done.stdout
