"""The rules of docs/design.md that the code can check, on every import statement of every module.

- The dependency direction: proto and model at the bottom (they import nothing of ours), node and
  coordinator above them and blind to each other, sim on top. The one documented exception:
  model/__main__.py (the CLI entry point, not the library) may import proto for `python -m model export`.
- No import cycles between our modules, function-level imports included: a cycle hidden behind an
  import inside a function is still a cycle (one of the two modules holds what the other needs, and
  that piece belongs on one side).
- No hand-written module over MAX_LINES lines: a module that long holds more than one job.
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

MAX_LINES = 500
# Written by protoc from proto/federation.proto (`make proto`), not by hand.
GENERATED = {"proto/federation_pb2.py", "proto/federation_pb2.pyi", "proto/federation_pb2_grpc.py",
             "proto/federation_pb2_grpc.pyi"}

# Temporary, each named with who removes it: a module still over MAX_LINES ("lines", path) or a cycle
# still present ("cycle", its modules sorted and joined by " "). The test fails when an entry is no
# longer needed, so each one is deleted the moment its fix lands.
KNOWN_EXCEPTIONS: dict[tuple[str, str], str] = {}


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


def module_name(path: Path, root: Path) -> str:
    """The dotted module name of ``path`` under ``root`` (a package's ``__init__.py`` is the package)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, root: Path, modules: set[str]) -> set[str]:
    """Modules among ``modules`` that ``path`` imports, at any level of the file, relative imports resolved.

    ``from a import b`` imports the module ``a.b`` when there is one, else the module ``a`` (b is a
    name defined there); ``import a.b`` imports ``a.b``.
    """
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                # level 1 is the module's own package, each further level one package up
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {m for m in found if m in modules and m != name}


def import_graph(root: Path, packages: set[str]) -> dict[str, set[str]]:
    """Module name -> the modules of ours it imports, over every ``*.py`` under ``root/<package>``."""
    paths = {module_name(p, root): p for pkg in packages for p in (root / pkg).rglob("*.py")}
    modules = set(paths)
    return {m: imported_modules(p, root, modules) for m, p in paths.items()}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected group of modules that import each other."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def connect(m: str) -> None:  # Tarjan's algorithm
        index[m] = low[m] = len(index)
        stack.append(m)
        for d in sorted(graph[m]):
            if d not in index:
                connect(d)
                low[m] = min(low[m], low[d])
            elif d in stack:
                low[m] = min(low[m], index[d])
        if low[m] == index[m]:
            group = set()
            while True:
                d = stack.pop()
                group.add(d)
                if d == m:
                    break
            if len(group) > 1:
                groups.append(group)

    for m in sorted(graph):
        if m not in index:
            connect(m)
    return [_shortest_cycle(graph, group) for group in groups]


def _shortest_cycle(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """The shortest cycle through the group's first module, found breadth-first inside the group."""
    start = min(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for m in frontier:
            for d in sorted(graph[m] & group):
                if d == start:
                    return paths[m] + [start]
                if d not in paths:
                    paths[d] = paths[m] + [d]
                    nxt.append(d)
        frontier = nxt
    raise AssertionError(f"no cycle through {start} in {sorted(group)}")


def long_modules(root: Path, packages: set[str], max_lines: int = MAX_LINES) -> dict[str, int]:
    """Hand-written modules (relative path -> line count) over ``max_lines`` lines."""
    found = {}
    for pkg in packages:
        for path in (root / pkg).rglob("*.py"):
            rel = path.relative_to(root).as_posix()
            n = len(path.read_text().splitlines())
            if n > max_lines and rel not in GENERATED:
                found[rel] = n
    return found


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_a_function_level_relative_cycle_is_found(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from .b import f\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/c.py": "def g():\n    from .. import a\n",  # level 2: pkg.a
        "pkg/b.py": "import os\ndef f():\n    from pkg.sub import c\n",
        "pkg/d.py": "from pkg import a, b\n",  # imports into the cycle, not part of it
    })
    graph = import_graph(tmp_path, {"pkg"})
    assert graph["pkg.sub.c"] == {"pkg.a"}
    assert graph["pkg.d"] == {"pkg.a", "pkg.b"}
    assert import_cycles(graph) == [["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]]


def test_names_imported_from_a_package_are_edges_to_its_init(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "from pkg.x import X\n",
        "pkg/x.py": "X = 1\n",
        "pkg/y.py": "from pkg import X\nfrom . import x\n",
    })
    graph = import_graph(tmp_path, {"pkg"})
    assert graph == {"pkg": {"pkg.x"}, "pkg.x": set(), "pkg.y": {"pkg", "pkg.x"}}
    assert import_cycles(graph) == []


def test_long_modules_skips_generated_code(tmp_path):
    _write(tmp_path, {
        "proto/federation_pb2_grpc.py": "x = 1\n" * 12,
        "proto/long.py": "x = 1\n" * 11,
        "proto/short.py": "x = 1\n" * 10,
    })
    assert long_modules(tmp_path, {"proto"}, max_lines=10) == {"proto/long.py": 11}


def test_no_import_cycles():
    cycles = {" ".join(sorted(c[:-1])): " -> ".join(c) for c in import_cycles(import_graph(ROOT, OURS))}
    new = [c for key, c in sorted(cycles.items()) if ("cycle", key) not in KNOWN_EXCEPTIONS]
    stale = [key for kind, key in KNOWN_EXCEPTIONS if kind == "cycle" and key not in cycles]
    assert not new, "import cycles: " + "; ".join(new)
    assert not stale, f"no longer cycles, remove them from KNOWN_EXCEPTIONS: {stale}"


def test_no_module_over_the_line_limit():
    found = long_modules(ROOT, OURS)
    new = [f"{rel} ({n} lines)" for rel, n in sorted(found.items()) if ("lines", rel) not in KNOWN_EXCEPTIONS]
    stale = [rel for kind, rel in KNOWN_EXCEPTIONS if kind == "lines" and rel not in found]
    assert not new, f"modules over {MAX_LINES} lines (split them by job): " + "; ".join(new)
    assert not stale, f"now within {MAX_LINES} lines, remove them from KNOWN_EXCEPTIONS: {stale}"
