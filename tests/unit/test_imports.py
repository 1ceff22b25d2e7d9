"""No import cycles among the modules of mtpcode/ and converters/.

Every import statement counts, wherever it stands: at module level, inside a function, under
``if TYPE_CHECKING:`` or in a ``try``. An import is an edge to the project module it names, resolved
the way Python resolves it: ``from . import x`` and ``from mtpcode.a import b`` lead to the
submodule ``b`` when there is one, else to the package ``mtpcode.a`` whose ``__init__`` holds the
name; ``import a.b.c`` leads to ``a.b.c``. The parent packages an import executes on the way are not
edges of their own (a package's ``__init__`` counts where a name is taken from it). Dynamic imports
(``importlib.import_module``) are not seen.

A failure lists each cycle (each strongly connected group of modules) with one shortest loop
through it and every import inside the group, as ``file:line``.

The same scan lists the function-level imports of a project module or of a heavy third-party one
(``HEAVY``) that say nothing about why they are deferred: no comment on the import's own lines or
on the line above it (a comment above a run of consecutive imports covers the run). That list is
information, not a failure: ``python tests/unit/test_imports.py`` prints it with any cycles, and
``pytest -s`` shows it too.
"""

from __future__ import annotations

import ast
import io
import sys
import tokenize
from collections import deque
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("mtpcode", "converters")

# Third-party packages slow to import or loading native code: a function-level import of one of
# these (or of a project module) should say why it is deferred.
HEAVY = frozenset({
    "llama_cpp", "torch", "numpy", "gguf", "sentencepiece", "starlette", "uvicorn", "anyio", "prompt_toolkit",
    "pygments", "httpx", "openai",
})


@dataclass(frozen=True)
class Import:
    """One import statement of ``module`` naming ``target`` (a dotted name, maybe not the project's)."""

    module: str  # the importing module
    path: Path
    line: int
    end_line: int
    target: str  # the module Python loads for it: a project module where it is one
    scope: str  # "module", "function" or "TYPE_CHECKING"
    source: str  # the statement's first line, stripped

    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def module_files(root: Path = REPO, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under the packages (``__init__`` as the package)."""
    out: dict[str, Path] = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _resolve(name: str, modules: set[str]) -> str:
    """The longest prefix of ``name`` that is a project module, else ``name`` itself."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in modules:
            return candidate
    return name


def scan_source(text: str, module: str, path: Path, modules: set[str], *, is_package: bool = False) -> list[Import]:
    """Every import statement of one module's source, resolved against the project's ``modules``."""
    tree = ast.parse(text, filename=str(path))
    lines = text.splitlines()
    package = module if is_package else module.rpartition(".")[0]
    found: list[Import] = []

    def add(node: ast.stmt, target: str, scope: str) -> None:
        found.append(Import(module, path, node.lineno, node.end_lineno or node.lineno, target, scope,
                            lines[node.lineno - 1].strip()))

    def visit(node: ast.AST, scope: str) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(node, _resolve(alias.name, modules), scope)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".") if package else []
                if node.level - 1 > len(base_parts):
                    return  # beyond the top-level package: Python would refuse it
                base = ".".join(base_parts[:len(base_parts) - (node.level - 1)])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                add(node, sub if sub in modules else _resolve(base, modules), scope)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            scope = "function"
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            inner = "TYPE_CHECKING" if scope == "module" else scope
            visit(node.test, scope)
            for child in node.body:
                visit(child, inner)
            for child in node.orelse:
                visit(child, scope)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, scope)

    visit(tree, "module")
    return found


def scan(root: Path = REPO, packages: tuple[str, ...] = PACKAGES) -> list[Import]:
    """Every import statement in every module of the packages."""
    files = module_files(root, packages)
    modules = set(files)
    out: list[Import] = []
    for name, path in files.items():
        out += scan_source(path.read_text(encoding="utf-8"), name, path, modules,
                           is_package=path.name == "__init__.py")
    return out


def import_graph(imports: list[Import], modules: set[str]) -> dict[str, dict[str, list[Import]]]:
    """module -> {project module it imports -> the statements that do}; no self edges."""
    graph: dict[str, dict[str, list[Import]]] = {m: {} for m in modules}
    for imp in imports:
        if imp.target in modules and imp.target != imp.module:
            edges = graph[imp.module].setdefault(imp.target, [])
            if not any(e.line == imp.line for e in edges):  # `from m import a, b`: one statement
                edges.append(imp)
    return graph


def strongly_connected(graph: dict[str, dict[str, list[Import]]]) -> list[list[str]]:
    """The groups of two or more modules that import each other, directly or through others (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return sorted(groups)


def shortest_loop(graph: dict[str, dict[str, list[Import]]], group: list[str]) -> list[str]:
    """A shortest loop through the group's first module, staying inside the group (first == last)."""
    start, members = group[0], set(group)
    came_from: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for nxt in sorted(graph[node]):
            if nxt not in members:
                continue
            if nxt == start:
                loop = [node]
                while loop[-1] != start:
                    loop.append(came_from[loop[-1]])
                return [start, *reversed(loop[:-1]), start]
            if nxt not in came_from:
                came_from[nxt] = node
                queue.append(nxt)
    raise AssertionError(f"no loop through {start}")  # a strongly connected group always has one


def describe_cycles(graph: dict[str, dict[str, list[Import]]], groups: list[list[str]]) -> str:
    blocks = []
    for group in groups:
        members = set(group)
        lines = [f"import cycle among {', '.join(group)}", f"  loop: {' -> '.join(shortest_loop(graph, group))}"]
        for module in group:
            for target in sorted(t for t in graph[module] if t in members):
                for imp in graph[module][target]:
                    lines.append(f"  {imp.where()}: {imp.source}  [{imp.scope}: {module} -> {target}]")
        blocks.append("\n".join(lines))
    return "\n".join(blocks)


def _comment_lines(text: str) -> set[int]:
    """Line numbers holding a comment."""
    out: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.COMMENT:
            out.add(tok.start[0])
    return out


def uncommented_deferred_imports(imports: list[Import], modules: set[str]) -> list[Import]:
    """Function-level imports of a project or ``HEAVY`` module with no comment on their lines or the line
    above (where the line above is another import, the comment above that run of imports counts)."""
    texts: dict[Path, tuple[list[str], set[int]]] = {}
    starts: dict[Path, dict[int, Import]] = {}
    for imp in imports:
        starts.setdefault(imp.path, {})[imp.end_line] = imp

    def covered(imp: Import) -> bool:
        if imp.path not in texts:
            text = imp.path.read_text(encoding="utf-8")
            texts[imp.path] = (text.splitlines(), _comment_lines(text))
        lines, comments = texts[imp.path]
        if any(n in comments for n in range(imp.line, imp.end_line + 1)):
            return True
        above = imp.line - 1
        if above >= 1 and lines[above - 1].lstrip().startswith("#"):
            return True
        previous = starts[imp.path].get(above)  # an import statement ending on the line above
        return previous is not None and covered(previous)

    out = []
    for imp in imports:
        if imp.scope != "function":
            continue
        top = imp.target.split(".")[0]
        if (imp.target in modules or top in HEAVY) and not covered(imp):
            out.append(imp)
    return sorted(set(out), key=lambda i: (str(i.path), i.line, i.target))


def report(root: Path = REPO) -> tuple[list[list[str]], str, list[Import]]:
    imports = scan(root)
    modules = set(module_files(root))
    graph = import_graph(imports, modules)
    groups = strongly_connected(graph)
    return groups, describe_cycles(graph, groups), uncommented_deferred_imports(imports, modules)


# --- the scanner on small sources ------------------------------------------------------------------

def _scan(text: str, module: str = "pkg.a.b", modules: frozenset[str] = frozenset(), **kw: bool) -> list[Import]:
    known = {"pkg", "pkg.a", "pkg.a.b", "pkg.a.c", "pkg.d", *modules}
    return scan_source(text, module, REPO / "x.py", known, **kw)


def test_every_kind_of_import_is_seen_and_resolved():
    text = ("from typing import TYPE_CHECKING\n"
            "from . import c\n"                 # submodule pkg.a.c
            "from .. import d, thing\n"         # submodule pkg.d; a name of pkg's __init__
            "from pkg.a import c as cc, NAME\n"  # submodule; a name of pkg/a/__init__
            "import pkg.d.sub\n"                # no such module: the deepest that exists
            "if TYPE_CHECKING:\n    from pkg.d import X\n"
            "try:\n    import numpy\nexcept ImportError:\n    pass\n"
            "def f():\n    from .c import g\n    class K:\n        import torch\n")
    found = [(i.target, i.scope) for i in _scan(text)]
    assert found == [("typing", "module"), ("pkg.a.c", "module"), ("pkg.d", "module"), ("pkg", "module"),
                     ("pkg.a.c", "module"), ("pkg.a", "module"), ("pkg.d", "module"),
                     ("pkg.d", "TYPE_CHECKING"), ("numpy", "module"), ("pkg.a.c", "function"),
                     ("torch", "function")]


def test_relative_imports_in_a_package_init():
    found = [i.target for i in _scan("from . import c\nfrom .c import x\n", module="pkg.a", is_package=True)]
    assert found == ["pkg.a.c", "pkg.a.c"]


def test_cycles_are_found_with_their_lines():
    a = "import pkg.b\n"
    b = "def f():\n    from pkg import c\n"
    c = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import X\n"
    modules = {"pkg", "pkg.a", "pkg.b", "pkg.c", "pkg.d"}
    imports = []
    for name, text in (("pkg.a", a), ("pkg.b", b), ("pkg.c", c), ("pkg.d", "import pkg.a\n")):
        imports += scan_source(text, name, REPO / f"{name}.py", modules)
    graph = import_graph(imports, modules)
    groups = strongly_connected(graph)
    assert groups == [["pkg.a", "pkg.b", "pkg.c"]]
    assert shortest_loop(graph, groups[0]) == ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]
    text = describe_cycles(graph, groups)
    assert "pkg.b.py:2: from pkg import c  [function: pkg.b -> pkg.c]" in text
    assert "pkg.c.py:3: from pkg.a import X  [TYPE_CHECKING: pkg.c -> pkg.a]" in text
    assert "pkg.d" not in text


def test_deferred_imports_without_a_reason_are_listed(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "m.py").write_text(
        "import numpy\n"                    # module level: not listed
        "def f():\n"
        "    import json\n"                 # light standard library: not listed
        "    import llama_cpp\n"            # listed
        "    import torch  # loads CUDA\n"
        "    # deferred: heavy\n"
        "    import numpy as np\n"
        "    from pkg import m\n"           # covered by the comment above the run
        "    x = 1\n"
        "    from pkg import m as again\n"  # listed
    )
    imports = scan(tmp_path, ("pkg",))
    listed = uncommented_deferred_imports(imports, set(module_files(tmp_path, ("pkg",))))
    assert [(i.line, i.target) for i in listed] == [(4, "llama_cpp"), (10, "pkg.m")]


# --- the project -----------------------------------------------------------------------------------

def test_the_project_has_no_import_cycle():
    modules = module_files()
    assert {"mtpcode.cli", "mtpcode.runtime", "converters.corpus"} <= set(modules)
    groups, text, _ = report()
    assert not groups, "\n" + text


def test_deferred_imports_say_why():
    """Information only (``pytest -s`` shows it): the function-level imports of project or heavy modules
    with no comment saying why they are deferred."""
    _, _, listed = report()
    if listed:
        print(f"\n{len(listed)} function-level imports without a comment saying why they are deferred:")
        for imp in listed:
            print(f"  {imp.where()}: {imp.source}")


if __name__ == "__main__":
    groups, text, listed = report()
    print(text or "no import cycles")
    print(f"\n{len(listed)} function-level imports of project or heavy modules without a comment:")
    for imp in listed:
        print(f"  {imp.where()}: {imp.source}")
    sys.exit(1 if groups else 0)
