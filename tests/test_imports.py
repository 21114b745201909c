"""The package's import graph, read from the source with `ast`: no import circles, and the layering rules
(algorithms never import the model zoo or the CLI; the library never imports the CLI).

Every import counts, at module level or inside a function: a function-local import only hides a circle.
Only imports under `if TYPE_CHECKING:` (annotations, never run) are left out.
Importing `onebasin.a.b` is an edge to `onebasin.a.b` alone (not to the packages above it, which Python
initialises first but which do not make a circle by themselves).
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "onebasin"


def module_files() -> dict[str, Path]:
    """{dotted module name: file} for every module of the package (a package is its __init__.py)."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _base(name: str, path: Path, level: int) -> str:
    """The package a relative import of `level` dots in module `name` (file `path`) starts from."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for _ in range(level - 1):
        package = package.rpartition(".")[0]
    return package


def _import_nodes(tree: ast.AST):
    """Every Import/ImportFrom node, at any depth, except inside `if TYPE_CHECKING:` blocks."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (n for child in node.orelse for n in _import_nodes(ast.Module([child], [])))
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        yield from _import_nodes(node)


def imports_of(name: str, path: Path, modules) -> set[str]:
    """The onebasin modules that module `name` imports anywhere in its source (annotation-only ones aside)."""
    out = set()
    for node in _import_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _base(name, path, node.level) if node.level else ""
            target = ".".join(p for p in (base, node.module or "") if p)
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules]  # from pkg import module
            targets = subs if len(subs) == len(node.names) else [target, *subs]
        else:
            continue
        for t in targets:
            while t and t not in modules:  # import onebasin.x.y where y is a name, not a module
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def import_graph() -> dict[str, set[str]]:
    """{module: the onebasin modules it imports}."""
    modules = module_files()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle [m0, m1, ..., m0], or None (depth-first search, three colours)."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        state[m] = "done"
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_import_graph_is_read_from_the_source():
    """Relative, absolute, from-package and function-local imports all give edges (checked on known modules)."""
    graph = import_graph()
    assert {"onebasin.rules.attention", "onebasin.rules.norms"} <= graph["onebasin.rules"]  # from . import attention
    assert "onebasin.align.weight" in graph["onebasin.align.functional"]  # from .weight import ...
    assert "onebasin.pipeline" in graph["onebasin._cli_merge"]  # from onebasin.pipeline import merge, in a function
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_circles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


@pytest.mark.parametrize("forbidden", ["onebasin.models", "onebasin.cli", "onebasin._cli_merge", "onebasin._cli_common"])
def test_algorithms_never_import_the_zoo_or_the_cli(forbidden):
    graph = import_graph()
    offenders = [m for m in graph if m.startswith("onebasin.align") and any(t == forbidden or t.startswith(forbidden + ".") for t in graph[m])]
    assert not offenders, f"{offenders} import {forbidden}"


def test_the_library_never_imports_the_cli():
    """The CLI is onebasin.cli and its parts onebasin._cli_*; nothing else imports them."""
    graph = import_graph()
    cli = {m for m in graph if m == "onebasin.cli" or m.startswith("onebasin._cli")}
    offenders = [m for m, targets in graph.items() if m not in cli and targets & cli]
    assert not offenders, f"{offenders} import the CLI"
