"""The package's shape: imports go one way, modules stay small, each says its one job."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tune_kd"
MAX_LINES = 450


def module_imports() -> dict[str, set[str]]:
    """module -> the tune_kd modules it imports anywhere in its file (inside functions too)."""
    modules = {path.stem for path in PACKAGE.glob("*.py")}
    graph = {}
    for path in PACKAGE.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[1] for alias in node.names if alias.name.startswith("tune_kd.")}
            elif isinstance(node, ast.ImportFrom) and node.module:
                if node.module == "tune_kd":
                    found |= {alias.name for alias in node.names if alias.name in modules}
                elif node.module.startswith("tune_kd."):
                    found.add(node.module.split(".")[1])
        graph[path.stem] = found - {path.stem}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle found by a depth-first walk (each reported once, from where it was entered)."""
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_among_tune_kd_modules():
    assert cycles(module_imports()) == []


def test_the_core_imports_one_way():
    graph = module_imports()
    order = ["data", "models", "losses", "teacher_cache", "loop"]
    for lower, higher in zip(order, order[1:]):
        assert lower not in graph or higher not in graph[lower], f"{lower} imports {higher}"


def test_no_module_over_the_line_limit_and_each_says_its_job():
    for path in sorted(PACKAGE.glob("*.py")):
        lines = len(path.read_text().splitlines())
        assert lines <= MAX_LINES, f"{path.name}: {lines} lines"
        if path.name != "__init__.py":
            assert ast.get_docstring(ast.parse(path.read_text())), f"{path.name} has no docstring"
