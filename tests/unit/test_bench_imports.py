"""The benchmark package's imports: no module of mtpcode/bench imports another in a cycle (every
import counts, inside functions and under ``if TYPE_CHECKING:`` too), and the modules the
``mtpcode`` command imports at start leave llama.cpp, torch and gguf unloaded."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import mtpcode.bench

BENCH = Path(mtpcode.bench.__file__).parent
PACKAGE = "mtpcode.bench"


def _imported(tree: ast.AST) -> set[str]:
    """Every module name an import statement anywhere in ``tree`` names, with ``from X import y``
    giving both ``X`` and ``X.y`` (``y`` may be a submodule)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from mtpcode.bench (level 1) or a package above it
                parent = PACKAGE.rsplit(".", node.level - 1)[0]
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def bench_import_graph() -> dict[str, set[str]]:
    """mtpcode.bench module -> the mtpcode.bench modules it imports."""
    modules = {f"{PACKAGE}.{p.stem}": p for p in sorted(BENCH.glob("*.py")) if p.stem != "__init__"}
    return {name: _imported(ast.parse(path.read_text(encoding="utf-8"))) & set(modules) - {name}
            for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_function_level_and_type_checking_imports_are_seen():
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from mtpcode.bench import run\n"
                     "def f():\n    from mtpcode.bench.synthetic import SHAPES\n")
    assert {"mtpcode.bench.run", "mtpcode.bench.synthetic"} <= _imported(tree)


def test_the_bench_package_has_no_import_cycle():
    graph = bench_import_graph()
    assert {"mtpcode.bench.run", "mtpcode.bench.synthetic", "mtpcode.bench.measure"} <= set(graph)
    assert find_cycle(graph) is None
    assert "mtpcode.bench.run" not in graph["mtpcode.bench.synthetic"]


def test_the_modules_the_cli_imports_leave_native_libraries_unloaded():
    code = ("import sys\nimport mtpcode.cli\n"
            "import mtpcode.bench.report, mtpcode.bench.costmodel, mtpcode.bench.typists\n"
            "print(sorted(m for m in ('llama_cpp', 'torch', 'gguf') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
