"""The package's import rules, read from the source with ast (every import, also those inside functions):

    engines/ and plugins/ never import qdit4sr.exporter   (they read the folder format in qdit4sr.artifacts)
    no library module imports qdit4sr.cli                 (the commands sit on top of the library)
    no import cycle between the package's modules
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "qdit4sr"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def imports_of(module: str) -> set[str]:
    """The package modules `module` imports (`from X import name` counts as X.name when that is a module)."""
    path = MODULES[module]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, path, node)
            found.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                         for alias in node.names)
    return {name for name in found if name in MODULES and name != module}


GRAPH = {module: imports_of(module) for module in MODULES}


def _under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_walk_sees_the_package():
    assert len(MODULES) > 50 and "qdit4sr.engines.build" in MODULES
    assert "qdit4sr.artifacts.manifest" in GRAPH["qdit4sr.engines.build"]
    assert "qdit4sr.plugins.contract" in GRAPH["qdit4sr.exporter.graph_rewrite"]   # from ..plugins import contract
    assert "qdit4sr.exporter.stages" in GRAPH["qdit4sr.cli.export"]                 # imported inside the command


@pytest.mark.parametrize("layer", ["qdit4sr.engines", "qdit4sr.plugins"])
def test_engines_and_plugins_never_import_the_exporter(layer):
    offending = {m: sorted(t for t in targets if _under(t, "qdit4sr.exporter"))
                 for m, targets in GRAPH.items() if _under(m, layer)}
    assert {m: t for m, t in offending.items() if t} == {}


def test_no_library_module_imports_the_cli():
    offending = {m: sorted(t for t in targets if _under(t, "qdit4sr.cli"))
                 for m, targets in GRAPH.items() if not _under(m, "qdit4sr.cli")}
    assert {m: t for m, t in offending.items() if t} == {}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert _cycles(GRAPH) == []


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
