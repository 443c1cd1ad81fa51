"""The import graph of transfuse: no cycles, and the layering of DESIGN.md §2.

Every module under ``transfuse/`` is parsed with :mod:`ast` (nothing is
imported). An edge ``a -> b`` is any import of ``b`` written in ``a``: at module
level or inside a function or class, absolute or relative (``from . import x``),
``importlib.import_module("transfuse....")`` / ``__import__`` with a literal
name, and, in a module that calls ``import_module`` with a computed name, every
string literal there that names a transfuse module (the tables of backends and
targets). ``from p import x`` is an edge to ``p.x`` when that is a module, else
to ``p``. Importing ``a.b.c`` also runs the ``__init__`` of ``a`` and ``a.b``;
those implicit edges are not drawn (every submodule would otherwise "import"
its package).

Imports under ``if TYPE_CHECKING:`` never run: they are left out of the cycle
check but still count for layering (a type from a forbidden layer is still a
dependency on it).

The checker is tested on a small synthetic package first, so a checker that
finds nothing is caught.
"""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Iterable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "transfuse"

#: DESIGN.md §2, "Who may import whom": layer -> the layers it may import. A layer is a
#: subpackage (or module) of the root; the root's ``errors`` may be imported by everyone and
#: a layer may always import itself. Layers not in the table (api, cli, models, ...) are free.
LAYERS: dict[str, frozenset[str]] = {
    "ir": frozenset({"errors"}),
    "frontend": frozenset({"ir", "errors"}),
    "passes": frozenset({"ir", "errors"}),
    "codegen": frozenset({"ir", "errors"}),
    "runtime": frozenset({"codegen", "ir", "passes.log", "errors"}),
}


@dataclasses.dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    line: int
    runs: bool  # False for imports under ``if TYPE_CHECKING:``

    def __str__(self) -> str:
        how = "" if self.runs else " (TYPE_CHECKING)"
        return f"{self.src} -> {self.dst}  (line {self.line}){how}"


# -- reading the package -----------------------------------------------------------


def module_names(root: Path) -> dict[str, Path]:
    """``{dotted module name: file}`` for every ``.py`` file under the package ``root``."""
    out: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _dynamic_name(call: ast.Call) -> ast.expr | None:
    """The name argument of ``importlib.import_module(...)`` / ``__import__(...)``, if this is one."""
    f = call.func
    name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
    if name in ("import_module", "__import__") and call.args:
        return call.args[0]
    return None


class _Collector(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool, known: Mapping[str, Path]):
        self.module, self.known = module, known
        self.package = module if is_package else module.rpartition(".")[0]
        self.edges: list[Edge] = []
        self.type_checking = 0
        self.computed_import = False  # import_module(<not a literal>) somewhere in the module
        self.literals: list[tuple[str, int]] = []

    def _resolve(self, name: str) -> str | None:
        """The longest known module that ``name`` is or lies in (None if not ours)."""
        while name:
            if name in self.known:
                return name
            name = name.rpartition(".")[0]
        return None

    def _add(self, target: str | None, line: int) -> None:
        if target is not None and target != self.module:
            self.edges.append(Edge(self.module, target, line, self.type_checking == 0))

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            self.type_checking += 1
            for stmt in node.body:
                self.visit(stmt)
            self.type_checking -= 1
            for stmt in node.orelse:
                self.visit(stmt)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(self._resolve(alias.name), node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.package.split(".") if self.package else []
            if node.level - 1 > len(base):
                raise ValueError(f"{self.module}:{node.lineno}: relative import beyond the root")
            base = base[: len(base) - (node.level - 1)]
            parent = ".".join(base + ([node.module] if node.module else []))
        else:
            parent = node.module or ""
        for alias in node.names:
            sub = f"{parent}.{alias.name}"
            self._add(sub if sub in self.known else self._resolve(parent), node.lineno)

    def visit_Call(self, node: ast.Call) -> None:
        arg = _dynamic_name(node)
        if arg is not None:
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                self._add(self._resolve(arg.value), node.lineno)
            else:
                self.computed_import = True
        self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        if isinstance(node.value, str) and node.value in self.known:
            self.literals.append((node.value, node.lineno))


def collect_edges(root: Path) -> tuple[list[str], list[Edge]]:
    """All modules of the package at ``root`` and every import edge between them."""
    known = module_names(root)
    edges: list[Edge] = []
    for name, path in known.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        c = _Collector(name, path.name == "__init__.py", known)
        c.visit(tree)
        if c.computed_import:  # a table of module names feeding import_module
            for target, line in c.literals:
                c._add(target, line)
        edges.extend(dict.fromkeys(c.edges))  # one edge per import line and target
    return sorted(known), edges


# -- checks ------------------------------------------------------------------------


@dataclasses.dataclass
class Cycle:
    """A strongly connected component of the import graph: its ``modules``, every import
    between them (``edges``: break enough of these) and one shortest cycle (``example``)."""

    modules: list[str]
    edges: list[Edge]
    example: list[Edge]

    def __str__(self) -> str:
        path = " -> ".join([e.src for e in self.example] + [self.example[0].src])
        return (f"{len(self.modules)} modules in a cycle, e.g. {path}\n"
                f"  imports between them:\n{_show(self.edges, indent=4)}")


def find_cycles(modules: Iterable[str], edges: Iterable[Edge]) -> list[Cycle]:
    """The import cycles: one :class:`Cycle` per strongly connected component that has one."""
    out_edges: dict[str, list[Edge]] = {m: [] for m in modules}
    for e in edges:
        if e.runs:
            out_edges[e.src].append(e)
    # Tarjan's algorithm, iterative (a deep package must not hit the recursion limit)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    for start in out_edges:
        if start in index:
            continue
        work = [(start, 0)]
        while work:
            v, i = work.pop()
            if i == 0:
                index[v] = low[v] = len(index)
                stack.append(v)
                on_stack.add(v)
            if i < len(out_edges[v]):
                work.append((v, i + 1))
                w = out_edges[v][i].dst
                if w not in index:
                    work.append((w, 0))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                components.append(comp)
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[v])
    cycles = []
    for comp in components:
        members = set(comp)
        if len(comp) == 1 and not any(e.dst == comp[0] for e in out_edges[comp[0]]):
            continue
        inside = [e for m in sorted(members) for e in out_edges[m] if e.dst in members]
        example = _cycle_in(sorted(members)[0], members, out_edges)
        cycles.append(Cycle(sorted(members), inside, example))
    return sorted(cycles, key=lambda c: c.modules)


def _cycle_in(start: str, members: set[str], out_edges: Mapping[str, list[Edge]]) -> list[Edge]:
    """A shortest cycle through ``start`` inside one strongly connected component (BFS)."""
    prev: dict[str, Edge] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for e in out_edges[v]:
                if e.dst not in members:
                    continue
                if e.dst == start:
                    path = [e]
                    while path[0].src != start:
                        path.insert(0, prev[path[0].src])
                    return path
                if e.dst not in prev:
                    prev[e.dst] = e
                    nxt.append(e.dst)
        frontier = nxt
    raise AssertionError(f"no cycle through {start}")  # a component always has one


def _layer(module: str, root: str, layers: Iterable[str]) -> str | None:
    """The most specific layer (``passes.log`` before ``passes``) that ``module`` belongs to."""
    rel = module[len(root) + 1:] if module.startswith(root + ".") else ""
    best = None
    for layer in layers:
        if (rel == layer or rel.startswith(layer + ".")) and (best is None or len(layer) > len(best)):
            best = layer
    return best


def layering_violations(root: str, edges: Iterable[Edge],
                        layers: Mapping[str, frozenset[str]] = LAYERS) -> list[Edge]:
    """Edges from a layer of the table to a module of ``root`` the table does not allow."""
    bad = []
    for e in edges:
        src = _layer(e.src, root, layers)
        if src is None:
            continue
        top = src.split(".")[0]
        allowed = {src, top} | set(layers[src])
        rel = e.dst[len(root) + 1:] if e.dst.startswith(root + ".") else ""
        if not any(rel == a or rel.startswith(a + ".") for a in allowed):
            bad.append(e)
    return bad


def _show(items: Iterable, indent: int = 2) -> str:
    return "\n".join(" " * indent + str(x) for x in items)


# -- the checker on a synthetic package (so it can fail) -------------------------------


SYNTHETIC = {
    "pkg/__init__.py": "",
    "pkg/errors.py": "",
    "pkg/api.py": "import pkg.codegen.emit\nimport pkg.frontend.read\n",
    "pkg/ir/__init__.py": "",
    "pkg/ir/graph.py": """
        from pkg.errors import Oops

        def __str__(self):
            from pkg.ir.printer import show  # inside a function: still an edge
            return show(self)
        """,
    "pkg/ir/printer.py": "from .graph import Graph\n",  # relative: pkg.ir.graph
    "pkg/ir/types.py": """
        from typing import TYPE_CHECKING
        if TYPE_CHECKING:
            from pkg.ir.opset import OpDef  # never runs: no cycle, but still layering
        """,
    "pkg/ir/opset.py": "from . import types\n",
    "pkg/passes/__init__.py": "",
    "pkg/passes/log.py": "",
    "pkg/passes/fuse.py": """
        import importlib

        def lower():
            return importlib.import_module("pkg.codegen.emit")
        """,
    "pkg/codegen/__init__.py": "",
    "pkg/codegen/emit.py": "from .. import ir\nfrom ..passes import log\n",
    "pkg/frontend/__init__.py": "",
    "pkg/frontend/read.py": """
        import importlib
        BACKENDS = {"a": "pkg.passes.fuse"}

        def load(name):
            return importlib.import_module(BACKENDS[name])

        def lower():
            from ..codegen import emit
            return emit
        """,
    "pkg/runtime/__init__.py": "",
    "pkg/runtime/run.py": "from pkg.passes import log\nfrom pkg.codegen import emit\n",
    "pkg/runtime/serve.py": "import pkg.frontend.read\n",
}


def test_checker_finds_cycles_and_layer_violations(make_package):
    root = make_package(SYNTHETIC)
    modules, edges = collect_edges(root)
    assert "pkg.ir" in modules and "pkg.ir.graph" in modules
    got = {(e.src, e.dst, e.runs) for e in edges}
    assert ("pkg.ir.graph", "pkg.ir.printer", True) in got  # function-level
    assert ("pkg.ir.printer", "pkg.ir.graph", True) in got  # relative
    assert ("pkg.ir.types", "pkg.ir.opset", False) in got  # TYPE_CHECKING
    assert ("pkg.ir.opset", "pkg.ir.types", True) in got  # from . import module
    assert ("pkg.passes.fuse", "pkg.codegen.emit", True) in got  # import_module literal
    assert ("pkg.frontend.read", "pkg.passes.fuse", True) in got  # table + computed name
    assert ("pkg.codegen.emit", "pkg.ir", True) in got  # from .. import package
    assert ("pkg.ir.graph", "pkg.errors", True) in got  # from module import name

    cycles = find_cycles(modules, edges)
    assert [[(e.src, e.dst) for e in c.example] for c in cycles] == [
        [("pkg.ir.graph", "pkg.ir.printer"), ("pkg.ir.printer", "pkg.ir.graph")]]
    assert cycles[0].modules == ["pkg.ir.graph", "pkg.ir.printer"]

    bad = {(e.src, e.dst) for e in layering_violations("pkg", edges)}
    assert bad == {
        ("pkg.passes.fuse", "pkg.codegen.emit"),  # passes never import codegen
        ("pkg.codegen.emit", "pkg.passes.log"),  # codegen never imports passes
        ("pkg.frontend.read", "pkg.passes.fuse"),  # frontend never imports passes
        ("pkg.frontend.read", "pkg.codegen.emit"),  # ... nor codegen
        ("pkg.runtime.serve", "pkg.frontend.read"),  # runtime never imports frontend
    }  # runtime -> passes.log and codegen are allowed; api may import anything


def test_checker_prints_a_longer_cycle_and_passes_a_clean_package(make_package):
    root = make_package({
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg import b\n",
        "pkg/b.py": "def f():\n    import pkg.c\n",
        "pkg/c.py": "import pkg.a\n",
        "pkg/d.py": "import pkg.a\nimport os\nimport torch\n",
    })
    modules, edges = collect_edges(root)
    (cycle,) = find_cycles(modules, edges)
    assert [e.src for e in cycle.example] == ["pkg.a", "pkg.b", "pkg.c"]
    assert "e.g. pkg.a -> pkg.b -> pkg.c -> pkg.a" in str(cycle)
    assert "pkg.b -> pkg.c  (line 2)" in str(cycle)
    assert all(e.src != "pkg.d" for e in cycle.edges)  # d imports the cycle, is not in it

    (root.parent / "pkg" / "c.py").write_text("import os\n")
    modules, edges = collect_edges(root)
    assert find_cycles(modules, edges) == []
    assert layering_violations("pkg", edges) == []


# -- the real package -------------------------------------------------------------------


def test_transfuse_has_no_import_cycles():
    modules, edges = collect_edges(ROOT)
    assert len(modules) > 50 and len(edges) > 100  # the checker really read the package
    cycles = find_cycles(modules, edges)
    text = "\n\n".join(str(c) for c in cycles)
    assert not cycles, f"{len(cycles)} import cycle(s) in transfuse/:\n{text}"


def test_transfuse_follows_the_layering_table():
    modules, edges = collect_edges(ROOT)
    bad = layering_violations("transfuse", edges)
    assert not bad, ("imports that DESIGN.md §2 forbids (layer -> may import: "
                     f"{ {k: sorted(v) for k, v in LAYERS.items()} }):\n{_show(bad)}")
