"""The package's structure: every module imports, the import graph has no cycles, and no library module imports a
command-line one (dependencies run one way: config/weights -> model -> loading -> generation -> CLI)."""

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import mlx_dgemma

PACKAGE = Path(mlx_dgemma.__file__).parent


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _skipped(node) -> bool:
    """`if TYPE_CHECKING:` (annotations only) and `if __name__ == "__main__":` (runs only as a script)."""
    if not isinstance(node, ast.If):
        return False
    test = ast.unparse(node.test)
    return test in ("TYPE_CHECKING", "typing.TYPE_CHECKING") or test.replace("'", '"') == '__name__ == "__main__"'


def _imports(tree):
    """Every import statement, at module level or inside functions (a deferred import is still a dependency)."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if _skipped(node):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    graph = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(parts + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t.startswith("mlx_dgemma") and t != name and t != "mlx_dgemma":
                    deps.add(t)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
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


def is_cli(name: str, path: Path) -> bool:
    """A command-line module: `cli.py`, `__main__.py`, or one that defines `main()`."""
    if path.stem in ("cli", "__main__"):
        return True
    return any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in ast.parse(path.read_text()).body)


@pytest.mark.parametrize("name", sorted(m for m in modules() if not m.endswith(".__main__")))  # those run a CLI
def test_every_module_imports(name):
    importlib.import_module(name)


def test_no_import_cycles():
    found = cycles(import_graph())
    graph = import_graph()
    assert not found, "import cycles: " + "; ".join(
        " <-> ".join(f"{m} (imports {sorted(graph[m] & set(c))})" for m in c) for c in found
    )


def test_no_library_module_imports_a_command_line_module():
    mods = modules()
    cli = {name for name, path in mods.items() if is_cli(name, path)}
    assert {"mlx_dgemma.generate", "mlx_dgemma.chat", "mlx_dgemma.convert", "mlx_dgemma.train"} <= cli
    graph = import_graph()
    wrong = {name: sorted(graph[name] & cli) for name in mods if name not in cli and graph[name] & cli}
    assert not wrong, f"library modules importing command-line ones: {wrong}"


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_walk_packages_sees_the_same_modules():
    walked = {m.name for m in pkgutil.walk_packages([str(PACKAGE)], "mlx_dgemma.")}
    assert walked | {"mlx_dgemma"} == set(modules())
