"""The package's layout holds: each stage imports only stages below it, and nothing imports in a circle.

Lowest first: runtime (copied into repositories, so it imports nothing else of tritonize) < errors,
version < export < repository < serving < deploy, api < cli < the package itself. Every import of every
module is read from its source (function-level imports included), so a lazy import cannot hide an
upward one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import tritonize

ROOT = Path(tritonize.__file__).resolve().parent
LAYERS = {
    "tritonize.runtime": 0,
    "tritonize.errors": 1,
    "tritonize.version": 1,
    "tritonize.export": 2,
    "tritonize.repository": 3,
    "tritonize.serving": 4,
    "tritonize.deploy": 5,
    "tritonize.api": 5,
    "tritonize.cli": 6,
    "tritonize": 7,
}
CLI_SUPPORT = {"tritonize.cli", "tritonize.cli.main", "tritonize.cli.options"}  # the rest: one command each


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py")) if "__pycache__" not in p.parts}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The tritonize modules ``name`` imports, anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        found |= {t for t in targets if t == "tritonize" or t.startswith("tritonize.")}
    return found - {name}


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def layer(module: str) -> int:
    matches = [prefix for prefix in LAYERS if module == prefix or module.startswith(prefix + ".")]
    return LAYERS[max(matches, key=len)]


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    problems = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            if module.startswith("tritonize.runtime") and not target.startswith("tritonize.runtime"):
                problems.append(f"{module} imports {target}: the runtime must work copied alone")
            elif layer(target) > layer(module):
                problems.append(f"{module} imports {target}, a later stage")
            elif target.startswith("tritonize.cli") and not module.startswith("tritonize.cli") and module != "tritonize":
                problems.append(f"{module} imports the command line {target}")
            elif (module.startswith("tritonize.cli.") and module not in CLI_SUPPORT and target not in CLI_SUPPORT
                  and target.startswith("tritonize.cli.")):
                problems.append(f"command {module} imports command {target}")
    return problems


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_every_module_belongs_to_a_stage():
    graph = import_graph()
    assert "tritonize.runtime.engine" in graph and "tritonize.cli.main" in graph
    assert all(layer(module) is not None for module in graph)


def test_no_module_imports_a_later_stage_or_the_command_line():
    assert upward_imports(import_graph()) == []


def test_no_import_circles():
    assert circles(import_graph()) == []


@pytest.mark.parametrize("graph, problem", [
    ({"tritonize.export.api": {"tritonize.repository.spec"}}, "a later stage"),
    ({"tritonize.runtime.engine": {"tritonize.errors"}}, "copied alone"),
    ({"tritonize.api": {"tritonize.cli.generate"}}, "a later stage"),
    ({"tritonize.cli.deploy": {"tritonize.cli.serve"}}, "command tritonize.cli.deploy imports command"),
])
def test_the_checks_catch_what_they_are_for(graph, problem):
    assert any(problem in line for line in upward_imports(graph))


def test_a_circle_is_found():
    graph = {"tritonize.repository.build": {"tritonize.repository.trtllm_build"},
             "tritonize.repository.trtllm_build": {"tritonize.repository.build"}, "tritonize.errors": set()}
    assert circles(graph) == [["tritonize.repository.build", "tritonize.repository.trtllm_build"]]
