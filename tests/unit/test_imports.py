"""The import graph of our own packages: no loops, and torch stays on the worker side.

Every ``import`` counts, module level or inside a function (a function-level import only hides a
loop until the function runs), except those under ``if TYPE_CHECKING:``.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGES = ("schemas", "middleware", "workers")


def module_paths() -> dict[str, pathlib.Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for child in ast.walk(node))
    return skipped


def imported_names(module: str, path: pathlib.Path) -> list[tuple[str, bool]]:
    """(dotted name, at module level) for every import statement of the module."""
    tree = ast.parse(path.read_text(), str(path))
    skipped = _type_checking_nodes(tree)
    top_level = {id(node) for node in tree.body}
    is_package = path.name == "__init__.py"
    names: list[tuple[str, bool]] = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names.extend((alias.name, id(node) in top_level) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names.append((base, id(node) in top_level))
            names.extend((f"{base}.{alias.name}", id(node) in top_level) for alias in node.names)
    return names


def import_graph() -> dict[str, set[str]]:
    """module -> our modules it imports (a name resolves to the longest module prefix we have)."""
    modules = module_paths()

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {module: set() for module in modules}
    for module, path in modules.items():
        for name, _ in imported_names(module, path):
            target = resolve(name)
            # a package's own submodules, and a module's enclosing packages, are not loops
            if target and target != module and not module.startswith(target + "."):
                graph[module].add(target)
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    for root, targets in graph.items():
        if root in index:
            continue
        work = [(root, iter(sorted(targets)))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    return cycles


def test_the_walker_finds_a_loop() -> None:
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_loops() -> None:
    graph = import_graph()
    assert len(graph) > 40, "the walk found too few modules"
    cycles = import_cycles(graph)
    assert cycles == [], "import loops: " + "; ".join(" <-> ".join(cycle) for cycle in cycles)


def test_schemas_and_workers_never_import_middleware() -> None:
    modules = module_paths()
    offenders = [f"{module} imports {name}" for module, path in modules.items()
                 if module.startswith(("schemas", "workers"))
                 for name, _ in imported_names(module, path) if name.split(".")[0] == "middleware"]
    assert offenders == []


def test_middleware_reaches_workers_and_torch_only_lazily() -> None:
    """A module-level import of workers, torch or transformers in middleware would load torch for every client."""
    modules = module_paths()
    heavy = ("workers", "torch", "transformers", "gguf", "accelerate")
    offenders = [f"{module} imports {name}" for module, path in modules.items() if module.startswith("middleware")
                 for name, at_top in imported_names(module, path) if at_top and name.split(".")[0] in heavy]
    assert offenders == []


def test_client_gateway_scheduler_and_cli_import_without_torch() -> None:
    code = ("import sys, middleware.client, middleware.gateway.app, middleware.scheduler.service, "
            "middleware.cli, middleware.cli.services, middleware.cli.batch, middleware.runtime.launcher; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=False).returncode == 0
