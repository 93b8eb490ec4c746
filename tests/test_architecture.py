"""The dependency direction of DESIGN.md, checked on every import statement of every module.

proto and model at the bottom (they import nothing of ours), node and coordinator above them and
blind to each other, sim on top. The one documented exception: model/__main__.py (the CLI entry
point, not the library) may import proto for `python -m model export`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = {"proto", "model", "node", "coordinator", "sim"}
ALLOWED = {
    "proto": set(),
    "model": set(),
    "node": {"model", "proto"},
    "coordinator": {"model", "proto"},
    "sim": {"model", "proto", "node", "coordinator"},
}
EXCEPTIONS = {("model/__main__.py", "proto")}


def imported_packages(path: Path) -> set[str]:
    """Top-level packages of ours that ``path`` imports (absolute imports only; relative stay inside)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & OURS


def test_imported_packages_sees_function_level_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import os\ndef f():\n    from coordinator.x import y\n    import sim.run\n")
    assert imported_packages(f) == {"coordinator", "sim"}


@pytest.mark.parametrize("package", sorted(OURS))
def test_dependency_direction(package):
    violations = []
    for path in sorted((ROOT / package).rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        for dep in imported_packages(path) - {package} - ALLOWED[package]:
            if (rel, dep) not in EXCEPTIONS:
                violations.append(f"{rel} imports {dep}")
    assert not violations, "dependency rule broken: " + "; ".join(violations)


def module_imports(path: Path, package: str) -> set[str]:
    """Modules of ``package`` that ``path`` imports, at any level of the file (function-level too)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level == 1:
                base = f"{package}.{base}" if base else package
            if base == package:  # from . import x / from model import x
                found |= {f"{package}.{a.name}" for a in node.names}
            elif base.startswith(package + "."):
                found.add(base)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith(package + ".")}
    return found


def test_model_has_no_import_cycles():
    # a cycle hidden behind a function-level import is still a cycle: one of the two holds what the
    # other needs, and that piece belongs on one side
    graph = {f"model.{p.stem}": module_imports(p, "model") for p in (ROOT / "model").glob("*.py")}
    graph = {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        for d in graph[m]:
            if d in stack:
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in done:
                visit(d, stack + [d])
        done.add(m)

    done: set[str] = set()
    for m in sorted(graph):
        if m not in done:
            visit(m, [m])
    assert not cycles, "import cycles in model/: " + "; ".join(sorted(set(cycles)))
