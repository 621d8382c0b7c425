"""Every third-party module the package imports is declared: at module level by the plain install, inside a
function by the plain install or an extra. (`.ci/smoke` proves the same by running every command in a clean
virtual environment; this test names the offending import in seconds.)"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "enchtable_jax"
# optional comparison sides that are never declared: imported under try/except and reported as unavailable
UNDECLARED_OPTIONAL = {"neural_tangents"}


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\s<>=!~\[;]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


def _distributions(module: str, installed: dict[str, list[str]]) -> set[str]:
    return {d.lower().replace("_", "-") for d in installed.get(module, [])}


def _imports() -> list[tuple[str, str, bool]]:
    """(file:line, top-level module, imported at module level) for every absolute import of the package."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        top_level = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules = [node.module]
            else:
                continue
            for module in modules:
                found.append((f"{path.relative_to(ROOT)}:{node.lineno}", module.split(".")[0], id(node) in top_level))
    return found


def test_every_import_is_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = _names(project["dependencies"])
    extras = set().union(*(_names(v) for k, v in project["optional-dependencies"].items() if k != "test"))
    problems = []
    installed = importlib.metadata.packages_distributions()  # module -> distributions (one scan of site-packages)
    for where, module, at_module_level in _imports():
        if module in sys.stdlib_module_names or module == "enchtable_jax" or module in UNDECLARED_OPTIONAL:
            continue
        dists = _distributions(module, installed) or {module.lower().replace("_", "-")}
        allowed = core if at_module_level else core | extras
        if not dists & allowed:
            problems.append(f"{where}: {module} ({', '.join(sorted(dists))}) is not declared"
                            + ("" if at_module_level or not dists & extras else " by the plain install"))
    assert not problems, "\n".join(problems)


def test_chat_templates_work_on_the_plain_install():
    """transformers renders chat templates with jinja2 without requiring it: the package must."""
    core = _names(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])
    assert "jinja2" in core
