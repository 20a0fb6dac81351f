"""The package's module import graph (every import, function-local ones included) has no cycle, and the library's
core never imports the digits testbed or the demo built on it."""

import ast
from pathlib import Path


PACKAGE = Path(__file__).resolve().parents[1] / "src" / "diffusers_dmdr"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports."""
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # `from . import schedules` imports the submodule; `from .config import X` the module `config`.
                targets.update(
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names
                )
        graph[name] = {target for target in targets if target in modules and target != name}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as a sorted list."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_the_graph_sees_relative_and_function_local_imports():
    graph = import_graph()
    assert "diffusers_dmdr.config" in graph["diffusers_dmdr.preflight"]  # `from .config import DMDRConfig`
    assert "diffusers_dmdr.rewards" in graph["diffusers_dmdr.evaluate"]  # inside parse_args
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_package_import_graph_is_acyclic():
    cycles = find_cycles(import_graph())
    assert cycles == [], "import cycles (modules that import each other, directly or through others): " + "; ".join(
        " <-> ".join(cycle) for cycle in cycles
    )


def test_config_imports_nothing_above_it():
    """The config describes a run; it must not pull in rewards, families or torch-level modules of the package."""
    assert import_graph()["diffusers_dmdr.config"] == set()


def test_the_core_never_imports_the_testbed():
    testbed = ("diffusers_dmdr.digits", "diffusers_dmdr.demo")
    importers = sorted(
        name
        for name, targets in import_graph().items()
        if not name.startswith(testbed) and any(target.startswith(testbed) for target in targets)
    )
    assert importers == [], f"library modules that import digits/ or the demo: {importers}"
