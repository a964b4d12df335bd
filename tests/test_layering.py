"""The import structure: no cycle among the modules of strata_quant.pipeline (imports inside
functions included), and no workers module imports pipeline (pipeline uses workers, never the
reverse). Read from the source with ast, so a lazy import counts as much as a top-level one."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"pipeline": ROOT / "pipeline", "workers": ROOT / "workers"}


def module_names() -> dict[str, Path]:
    out = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(("strata_quant", package, *parts))] = path
    return out


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``path`` imports (``from package import module`` resolved to the module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        else:
            continue
        found.update(n for n in names if n in modules)
    return found


def graph() -> dict[str, set[str]]:
    modules = module_names()
    return {name: imports_of(path, modules) - {name} for name, path in modules.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle among ``edges`` (a path that returns to its start), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_cycle_finder_finds_a_cycle_and_passes_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_scan_sees_the_assembly_path():
    edges = graph()
    assert "strata_quant.pipeline.formats.base" in edges["strata_quant.pipeline.assemble"]
    assert "strata_quant.pipeline.formats.base" in edges["strata_quant.pipeline.formats.gguf"]


def test_no_import_cycle_in_pipeline():
    edges = graph()
    pipeline = {
        m: {n for n in e if n.startswith("strata_quant.pipeline")} for m, e in edges.items() if ".pipeline" in m
    }
    assert find_cycle(pipeline) is None, " → ".join(find_cycle(pipeline))


def test_workers_never_import_pipeline():
    bad = {
        m: sorted(e) for m, e in graph().items() if ".workers" in m for n in e if n.startswith("strata_quant.pipeline")
    }
    assert not bad, bad
