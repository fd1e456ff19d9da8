"""The package's shape: imports flow one way (no cycles, function-level imports included), each
layer depends only on the layers below it, and the step registry is the only place steps live."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "compress"

# Bottom to top: a module may import its own layer's modules and those of lower layers only.
LAYERS = [
    ["compress._version", "compress.errors", "compress.checks", "compress.yamlsafe", "compress.images",
     "compress.labelsets", "compress.accel"],
    ["compress.distributed", "compress.config"],
    ["compress.io", "compress.system", "compress.progress"],
    ["compress.models"],
    ["compress.streaming"],
    ["compress.data"],
    ["compress.distill", "compress.training"],
    ["compress.analysis"],
    ["compress.compression"],
    ["compress.deploy"],
    ["compress.reports"],
    ["compress.jobs"],
    ["compress.recipe", "compress.optimize"],
    ["compress.cli"],
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def import_graph() -> dict[str, set[str]]:
    """Every ``compress`` module and the ``compress`` modules it imports, at any level of nesting
    (function-level imports included, ``if TYPE_CHECKING:`` blocks left out)."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        skip = _type_checking_lines(tree)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(tree):
            if getattr(node, "lineno", None) in skip:
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def _layer(module: str) -> int | None:
    for i, layer in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in layer):
            return i
    return None


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 40 and "compress.recipe.runner" in graph
    cycle = _find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = import_graph()
    graph["compress.models.introspect"] = graph["compress.models.introspect"] | {"compress.recipe.runner"}
    assert _find_cycle(graph) is not None


def test_every_module_has_a_layer_and_imports_only_downwards():
    graph = import_graph()
    upward = []
    for module, targets in graph.items():
        if module == "compress":  # the package's public API re-exports from every layer
            continue
        own = _layer(module)
        assert own is not None, f"{module} belongs to no layer of tests/test_architecture.py"
        upward += [f"{module} -> {t}" for t in targets if (_layer(t) or 0) > own]
    assert not upward, "imports that go up a layer:\n" + "\n".join(sorted(upward))


def test_the_library_does_not_know_the_command_line():
    graph = import_graph()
    for module, path in _modules().items():
        if module.startswith("compress.cli"):
            continue
        text = path.read_text()
        assert "import argparse" not in text, f"{module} imports argparse"
        assert not any(t.startswith("compress.cli") for t in graph[module]), f"{module} imports the CLI"


@pytest.mark.parametrize("limit", [500])
def test_no_module_is_over_the_size_limit(limit):
    long = {m: len(p.read_text().splitlines()) for m, p in _modules().items()}
    assert not {m: n for m, n in long.items() if n > limit}
