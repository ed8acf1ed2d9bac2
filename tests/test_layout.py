"""The package's import graph: no module imports one that imports it back.

A package's __init__ re-exporting its own modules is not a cycle; a module importing names
from its package's __init__ (which imports it) is.

Every `import` counts, those inside functions too (a lazy import is still a dependency).
The one allowed exception is `MoGETransformer.save_pretrained`, a convenience that calls
`moge.interop` (which builds models) when it is used.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "moge"
ALLOWED = {("moge.model.transformer", "moge.interop")}  # save_pretrained, imported when called


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("moge"):
            subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules]
            found.update(subs)
            if len(subs) < len(node.names):  # names defined in the module (or package) itself
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in modules)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {name: _imports(path, modules) for name, path in modules.items()}
    for edge in ALLOWED:
        graph[edge[0]].discard(edge[1])
    return graph


def _cycle_from(graph: dict[str, set[str]], start: str) -> list[str] | None:
    """A path start -> ... -> start, or None (depth-first search)."""
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for nxt in sorted(graph[node]):
            if nxt == start:
                return [*path, start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, [*path, nxt]))
    return None


def test_no_module_imports_one_that_imports_it_back():
    graph = _graph()
    cycles = [c for name in sorted(graph) if (c := _cycle_from(graph, name))]
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles[:5])


def test_the_checker_sees_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycle_from(graph, "a") == ["a", "b", "c", "a"]
    assert _cycle_from(graph, "d") is None


def test_the_layer_does_not_depend_on_the_trainer():
    graph = _graph()
    for name in (
        "moge.routing",
        "moge.balance",
        "moge.capacity",
        "moge.layer",
        "moge.experts",
        "moge.dropin",
        "moge.testing",
        "moge.sigma.routing",
    ):
        reach, todo = set(), [name]
        while todo:
            for nxt in graph[todo.pop()] - reach:
                reach.add(nxt)
                todo.append(nxt)
        upper = (
            "moge.model",
            "moge.training",
            "moge.distributed",
            "moge.interop",
            "moge.diagnostics",
            "moge.tools",
        )
        upward = sorted(r for r in reach if r.startswith(upper))
        assert not upward, f"{name} reaches {upward}"
