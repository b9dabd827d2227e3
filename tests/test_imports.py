"""The package layering, read from the source (every import, module-level and inside functions):

    svg2_kernels <- svg2 core <- svg2.methods <- svg2.integrations <- svg2.harness <- analysis <- experiments
    svg2 core <- svg2.parallel <- svg2.integrations (lazily), svg2.harness

No cycles between these units; ``svg2`` never imports ``analysis`` or ``experiments``; scripts in ``experiments/``
never import each other. ``svg2/__init__.py`` is the public facade and may re-export from any svg2 unit.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOP = ("svg2", "svg2_kernels", "analysis", "experiments")


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _unit(module: str) -> str:
    """svg2.<subpackage> for modules of a subpackage; the top-level name otherwise (svg2 core modules: svg2)."""
    parts = module.split(".")
    if parts[0] == "svg2" and len(parts) > 1 and (ROOT / "svg2" / parts[1]).is_dir():
        return f"svg2.{parts[1]}"
    if parts[0] == "experiments" and len(parts) > 1:
        return module  # each script is its own unit: they must not import each other
    return parts[0]


def _imports() -> dict[str, set[str]]:
    """module -> the project modules it imports (absolute imports; the project uses no relative ones)."""
    out: dict[str, set[str]] = {}
    for folder in ("svg2", "svg2_kernels", "analysis", "experiments"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            found = set()
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.ImportFrom):
                    assert node.level == 0, f"{path}: relative import; use absolute imports"
                    names = [node.module or ""]
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                else:
                    continue
                found |= {n for n in names if n.split(".")[0] in TOP}
            out[_module(path)] = found
    return out


def _unit_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for module, targets in _imports().items():
        if module == "svg2":  # the facade
            continue
        for t in targets:
            if _unit(t) != _unit(module):
                graph[_unit(module)].add(_unit(t))
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(u: str) -> list[str] | None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph.get(u, ())):
            if state.get(v) == 1:
                return stack[stack.index(v):] + [v]
            if v not in state and (c := visit(v)):
                return c
        stack.pop()
        state[u] = 2
        return None

    for u in sorted(graph):
        if u not in state and (c := visit(u)):
            return c
    return None


def test_no_import_cycles_between_units():
    graph = _unit_graph()
    assert "svg2.harness" in graph and "svg2.parallel" in graph  # the walk saw the packages
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph))}"


def test_layering_rules():
    graph = _unit_graph()
    for unit, targets in graph.items():
        if unit.startswith("svg2"):
            assert not {t for t in targets if t.startswith(("analysis", "experiments"))}, (unit, targets)
        if unit == "svg2_kernels":
            assert not {t for t in targets if t.startswith("svg2.") or t == "svg2"}, targets
        if unit == "analysis":
            assert not {t for t in targets if t.startswith("experiments")}, targets
        if unit.startswith("experiments."):
            assert not {t for t in targets if t.startswith("experiments")}, (unit, targets)
    assert "svg2.harness" not in graph["svg2.parallel"]


def test_the_checker_sees_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
