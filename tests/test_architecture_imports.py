"""An architecture is a plug-in: no model package imports another architecture's package (adding UniRS touched no
RSUniVLM module, and the next architecture must not reach into either). Read from the source (every import,
lazy ones inside functions too), so it holds whatever a test run happened to import."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from rsedge.models.registry import ARCHITECTURES

ROOT = Path(__file__).parents[1]


def imported_modules(source: str, package: str) -> set[str]:
    """Every module a source imports, absolute names (``from . import x`` resolved against its ``package``)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
    return names


def test_the_check_sees_lazy_and_relative_imports():
    source = "def f():\n    from ..rsunivlm import weights\n    import rsedge.models.rsunivlm.config\n"
    found = imported_modules(source, "rsedge.models.unirs")
    assert {"rsedge.models.rsunivlm.weights", "rsedge.models.rsunivlm.config"} <= found


@pytest.mark.parametrize("arch", [a.name for a in ARCHITECTURES])
def test_no_architecture_imports_another(arch):
    others = [a.module for a in ARCHITECTURES if a.name != arch]
    package = ROOT / Path(*next(a.module for a in ARCHITECTURES if a.name == arch).split("."))
    files = sorted(package.rglob("*.py"))
    assert files
    for f in files:
        package_name = ".".join(f.relative_to(ROOT).with_suffix("").parts[:-1])
        found = imported_modules(f.read_text(), package_name)
        bad = sorted(m for m in found if any(m == o or m.startswith(o + ".") for o in others))
        assert not bad, f"{f.relative_to(ROOT)} imports {bad}"
