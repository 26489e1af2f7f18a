"""
The layout of C{esf/}: which part may import which (docs/server.md, "How the
server is built"), and the size bounds of its modules and classes.

Every import counts: at module level, inside functions, and under
C{TYPE_CHECKING}, since a type-only import is still a dependency a reader
has to follow.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ESF = ROOT / "esf"

#: The parts of esf: its packages, and its top-level modules each on its own.
#: What each may import of esf, besides itself.
ALLOWED = {
    "esf.wire": set(),
    "esf.interfaces": {"esf.wire"},
    "esf.offline": {"esf.wire", "esf.interfaces"},
    "esf.client": {"esf.wire", "esf.interfaces"},
    "esf.server": {"esf.wire", "esf.interfaces", "esf.offline"},
    "esf.cluster": {"esf.wire", "esf.interfaces", "esf.offline", "esf.server"},
    "esf.operations": {"esf.wire", "esf.interfaces", "esf.server"},
    "esf.bench": {"esf.wire", "esf.interfaces", "esf.client"},
    "esf.examples": {"esf", "esf.wire", "esf.interfaces"},
    "esf.blocking": {"esf.client"},
    "esf.cli": {"esf.client"},
}


def _part(module: str) -> str:
    """
    The part of esf C{module} (a dotted name) belongs to.
    """
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else "esf"


def _modules() -> dict[str, Path]:
    modules = {}
    for path in ESF.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _imports(module: str, path: Path) -> set[str]:
    """
    The esf modules C{module} imports, anywhere in its source.
    """
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            # "from esf.wire import _frames" imports esf.wire._frames.
            found.update(f"{target}.{a.name}" for a in node.names)
    modules = _modules()
    return {name for name in found if name in modules and name != module}


def _part_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, path in _modules().items():
        part = _part(module)
        edges = graph.setdefault(part, set())
        edges.update(_part(target) for target in _imports(module, path))
        edges.discard(part)
    return graph


def test_imports_follow_the_layout():
    """
    Each part imports only the parts below it: nothing but C{esf.wire} and
    C{esf.interfaces} in the client and the offline stores, nothing of esf
    in C{esf.wire}.
    """
    wrong = []
    for module, path in sorted(_modules().items()):
        part = _part(module)
        if part not in ALLOWED:
            continue
        for target in sorted(_imports(module, path)):
            if _part(target) not in ALLOWED[part] | {part}:
                wrong.append(f"{module} imports {target}")
    assert wrong == []


def test_no_import_cycle_between_parts():
    graph = _part_graph()
    cycles = []

    def visit(part: str, trail: list[str]) -> None:
        for target in sorted(graph.get(part, ())):
            if target in trail:
                cycles.append(trail[trail.index(target) :] + [target])
            elif target != part:
                visit(target, trail + [target])

    for part in sorted(graph):
        visit(part, [part])
    assert cycles == []


def test_the_layout_knows_every_part():
    """
    A new package is placed in the layout (C{ALLOWED}, and the docs' map)
    on purpose, not by accident.
    """
    parts = set(_part_graph())
    top = {"esf", "esf.tap", "esf.testing", "esf.pytest_plugin"}
    assert parts - top == set(ALLOWED)


@pytest.mark.parametrize("module", sorted(_modules()))
def test_size_bounds(module):
    """
    No module over 800 lines, no class over 300.
    """
    path = _modules()[module]
    source = path.read_text("utf-8")
    assert len(source.splitlines()) <= 800, (
        f"{path.relative_to(ROOT)}: {len(source.splitlines())} lines"
    )
    tree = ast.parse(source)
    big = [
        f"{node.name}: {node.end_lineno - node.lineno + 1} lines"
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 300
    ]
    assert big == []
