"""Private names stay in their module (STYLE.md habit 14).

Parsed with :mod:`ast`, nothing imported. A module's private names are the
``_name`` attributes it assigns on ``self``/``cls`` and the ``_name`` functions,
classes and variables it defines at top level. It is a violation when another
module of the package

- imports one (``from transfuse.codegen.onnx import _safe``), or
- reads or writes one on some object that is not its own ``self``/``cls``
  (``graph._names``, ``node._erased``), unless it defines that name itself.

Private modules (``opdefs/_util.py``) are package-internal by convention and
may be imported by their siblings. Dunders are public.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "transfuse"


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _body_names(body: list[ast.stmt]) -> set[str]:
    """Functions, classes and variables (``__slots__`` entries too) defined in ``body``."""
    names: set[str] = set()
    for stmt in body:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(stmt.name)
        elif isinstance(stmt, (ast.Assign, ast.AnnAssign)):
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
            if any(isinstance(t, ast.Name) and t.id == "__slots__" for t in targets):
                names.update(c.value for c in ast.walk(stmt.value)
                             if isinstance(c, ast.Constant) and isinstance(c.value, str))
    return names


def _defined_private_names(tree: ast.Module) -> set[str]:
    names = _body_names(tree.body)  # top level
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):  # methods, class attributes, dataclass fields, slots
            names |= _body_names(node.body)
        elif (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
                and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
            names.add(node.attr)  # self._x = ... / cls._x = ... anywhere
    return {n for n in names if _private(n)}


def private_uses(root: Path) -> list[str]:
    """``file:line: what`` for every use of another module's private name."""
    trees = {p: ast.parse(p.read_text(), filename=str(p)) for p in sorted(root.rglob("*.py"))}
    owned = {p: _defined_private_names(t) for p, t in trees.items()}
    everyone = set().union(*owned.values()) if owned else set()
    pkg = root.name
    out = []
    for path, tree in trees.items():
        rel = path.relative_to(root.parent)
        mine = owned[path]
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and (
                    node.module == pkg or node.module.startswith(pkg + ".")):
                where = root.parent.joinpath(*node.module.split("."))
                for alias in node.names:
                    is_module = (where / f"{alias.name}.py").exists() or (where / alias.name).is_dir()
                    if _private(alias.name) and not is_module:
                        out.append(f"{rel}:{node.lineno}: imports {node.module}.{alias.name}")
            elif (isinstance(node, ast.Attribute) and node.attr in everyone
                  and node.attr not in mine
                  and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
                out.append(f"{rel}:{node.lineno}: uses {ast.unparse(node)}")
    return out


def test_checker_finds_private_imports_and_attribute_uses(make_package):
    root = make_package({
        "pkg/__init__.py": "",
        "pkg/_util.py": "def helper():\n    pass\n",
        "pkg/graph.py": """
            _CACHE = {}

            class Node:
                def __init__(self):
                    self._erased = False
                    self.__dunder = 1

                def same(self, other):
                    return other._erased  # the defining module may
            """,
        "pkg/verify.py": """
            from pkg import _util
            from pkg.graph import _CACHE

            def check(node):
                _util.helper()
                return node._erased or node.__class__
            """,
        "pkg/other.py": """
            class Own:
                def __init__(self):
                    self._erased = 0

                def peek(self, o):
                    return o._erased  # defines _erased itself: its own name
            """,
        "pkg/fields.py": """
            import dataclasses

            @dataclasses.dataclass
            class Spec:
                _hidden: int = 0

                def _helper(self):
                    pass

            class Slotted:
                __slots__ = ("_slot",)

            def read(spec, other):
                return spec._hidden + spec._slot + other._helper()  # all its own
            """,
        "pkg/user.py": """
            def peek(spec):
                return spec._hidden, spec._slot, spec._helper()
            """,
    })
    assert private_uses(root) == [
        "pkg/user.py:3: uses spec._hidden",
        "pkg/user.py:3: uses spec._slot",
        "pkg/user.py:3: uses spec._helper",
        "pkg/verify.py:3: imports pkg.graph._CACHE",
        "pkg/verify.py:7: uses node._erased",
    ]


def test_transfuse_uses_no_private_name_of_another_module():
    bad = private_uses(ROOT)
    assert not bad, "private names used outside their module:\n" + "\n".join(bad)


def private_module_imports(root: Path) -> list[str]:
    """``file:line: what`` for every import of a private module (``_util``) from outside the
    package that holds it (siblings may share one; nobody else may)."""
    pkg = root.name
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent)
        home = ".".join(rel.with_suffix("").parts[:-1])  # the importing module's package
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                parts = name.split(".")
                if parts[0] != pkg:
                    continue
                for i, part in enumerate(parts):
                    if not _private(part):
                        continue
                    owner = ".".join(parts[:i])
                    if root.parent.joinpath(*parts[:i + 1]).with_suffix(".py").exists() \
                            and owner != home:
                        out.append(f"{rel}:{node.lineno}: imports private module "
                                   f"{'.'.join(parts[:i + 1])}")
                    break
    return sorted(set(out))


def test_checker_finds_private_module_imports_from_other_packages(make_package):
    root = make_package({
        "pkg/__init__.py": "",
        "pkg/a/__init__.py": "",
        "pkg/a/_util.py": "def helper():\n    pass\n",
        "pkg/a/ops.py": "from pkg.a._util import helper\n",
        "pkg/b.py": "from pkg.a._util import helper\nimport pkg.a._util\n",
    })
    assert private_module_imports(root) == ["pkg/b.py:1: imports private module pkg.a._util",
                                            "pkg/b.py:2: imports private module pkg.a._util"]


def test_private_modules_are_imported_only_by_their_siblings():
    bad = private_module_imports(ROOT)
    assert not bad, "private modules imported from another package:\n" + "\n".join(bad)
