"""The agent's modules form no import cycle, counting imports made only for type checking: each part gets
what it needs of the agent through a small Protocol of its own, so that main.py alone imports the parts."""

from __future__ import annotations

import ast
from pathlib import Path

AGENT = Path(__file__).resolve().parent.parent / "micropod" / "agent"


def imports_of(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "micropod.agent":
                found.update(alias.name for alias in node.names)
            elif node.module.startswith("micropod.agent."):
                found.add(node.module.split(".")[2])
    return found - {path.stem}


def test_the_agent_modules_import_each_other_without_a_cycle() -> None:
    graph = {path.stem: imports_of(path) for path in AGENT.glob("*.py")}
    state: dict[str, str] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for dependency in sorted(graph.get(module, ())):
            assert state.get(dependency) != "open", f"import cycle: {' -> '.join([*trail, dependency])}"
            if dependency not in state:
                visit(dependency, [*trail, dependency])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
