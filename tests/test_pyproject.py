"""pyproject.toml tells the truth: every third-party module rsedge needs is declared (in the base install or an
extra; an import under ``except ImportError`` is optional by construction), and every test marker marks a test."""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> set[str]:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]
    return {_norm(re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0]) for r in reqs}


def _catches_import_error(node: ast.Try) -> bool:
    names = set()
    for handler in node.handlers:
        kinds = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
        names |= {k.id for k in kinds if isinstance(k, ast.Name)}
    return bool(names & {"ImportError", "ModuleNotFoundError"})


def _hard_imports(node: ast.AST, found: dict[str, set[str]], where: str) -> None:
    """Top-level module names imported by ``node`` and below, except inside ``try: ... except ImportError``
    (an optional import that degrades gracefully, such as cupy-or-cuda-python)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        names = [node.module]
    else:
        names = []
    for name in names:
        found.setdefault(name.split(".")[0], set()).add(where)
    for field, value in ast.iter_fields(node):
        if isinstance(node, ast.Try) and field == "body" and _catches_import_error(node):
            continue
        for child in value if isinstance(value, list) else [value]:
            if isinstance(child, ast.AST):
                _hard_imports(child, found, where)


def test_every_imported_package_is_declared():
    declared = _declared()
    dists = packages_distributions()
    found: dict[str, set[str]] = {}
    for path in (ROOT / "rsedge").rglob("*.py"):
        _hard_imports(ast.parse(path.read_text(), str(path)), found, str(path.relative_to(ROOT)))
    missing = {}
    for module, files in found.items():
        if module in sys.stdlib_module_names or module in ("rsedge", "__future__"):
            continue
        # A module not installed here (tensorrt on a workstation) is looked for under its own name.
        candidates = {_norm(d) for d in dists.get(module, [module])}
        if not candidates & declared:
            missing[module] = sorted(files)
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_every_registered_marker_marks_a_test():
    tomllib = pytest.importorskip("tomllib")
    markers = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["markers"]
    tests = "\n".join(p.read_text() for p in (ROOT / "tests").glob("*.py"))
    unused = [m.split(":")[0] for m in markers if not re.search(rf"\bmark\.{re.escape(m.split(':')[0])}\b", tests)]
    assert not unused, f"markers that mark no test (so selecting by them tests nothing): {unused}"
