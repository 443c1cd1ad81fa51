"""The text form of a graph: one line per constant and per node.

```
graph main(%x: f32[batch, seq, 64], %ids: i64[batch, seq]) {
  const %w: f32[32, 64]
  const %half: f32[] = 0.5
  %0: f32[batch, seq, 32] = linear(%x, %w, _)  # uses=1 @h.0.attn.q <- cleanup.fold-views
  %1: f32[batch, seq, 16], %2: f32[batch, seq, 16] = split(%0) {axis=-1, sizes=[16, 16]}
  return %1, %2
}
```

Attributes are printed in their OpDef order and only when they differ from
the default; a true bool prints bare (``causal``), ``None`` as ``none``,
strings JSON-quoted, floats with ``repr`` (exact), dims as expressions, dtypes
by short name. ``_`` is a missing optional input. The trailing comment holds
the use count per output, ``@`` the user's module path and ``<-`` the pass or
rule that made the node. Small constants (at most :data:`INLINE_MAX` elements)
print their value inline. :mod:`transfuse.ir.parser` reads the same text back:
``print(parse(print(g))) == print(g)``.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import sympy
import torch

from transfuse.ir.opdef import REQUIRED, Attr
from transfuse.ir.ops import all_ops
from transfuse.ir.types import DType, TensorType, dim_str

if TYPE_CHECKING:  # annotations only: graph.py imports this module for Graph.__str__
    from transfuse.ir.graph import Graph, Node, Value

#: constants with at most this many elements print their value inline
INLINE_MAX = 8

_BARE_NAME = re.compile(r"[A-Za-z0-9_.\-]+\Z")


# -- pieces --------------------------------------------------------------------


@functools.lru_cache(maxsize=8192)
def _dim_text(d: Any) -> str:
    return dim_str(d)


def _dim(d: Any) -> str:
    return str(d) if isinstance(d, int) else _dim_text(d)


_TYPE_CACHE: dict[tuple, str] = {}


def type_str(t: TensorType) -> str:
    """``f32[batch, seq, 768]`` (memoised: sympy printing is slow)."""
    key = (t.dtype, t.shape, t.quant)
    s = _TYPE_CACHE.get(key)
    if s is None:
        quant = "" if t.quant is None else f"{{{t.quant}}}"
        s = f"{t.dtype.value}{quant}[{', '.join(_dim(d) for d in t.shape)}]"
        if len(_TYPE_CACHE) < 65536:
            _TYPE_CACHE[key] = s
    return s


def format_float(x: float) -> str:
    """``repr`` of a float: exact and parseable (``inf``, ``-inf``, ``nan`` included)."""
    return repr(float(x))


def format_attr_value(kind: str, value: Any) -> str:
    """One attribute value in the text form, by its OpDef kind."""
    if value is None:
        return "none"
    base = kind.rstrip("?")
    if base in ("int", "float", "bool", "str", "dtype", "dim"):
        return _scalar_attr(base, value)
    if base in ("ints", "floats", "dims"):
        return "[" + ", ".join(_scalar_attr(base[:-1], v) for v in value) + "]"
    return format_literal(value)


def _scalar_attr(kind: str, value: Any) -> str:
    if kind == "float":
        return format_float(value)
    if kind == "int":
        return str(int(value))
    if kind == "dim":
        return _dim(value)
    if kind == "dtype":
        return value.value if isinstance(value, DType) else str(value)
    return format_literal(value)


def format_literal(value: Any) -> str:
    """A generic literal (attrs of kind ``any``): none, bools, numbers, strings, lists, dtypes, dims."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return format_float(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, DType):
        return value.value
    if isinstance(value, sympy.Basic):
        return _dim(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_literal(v) for v in value) + "]"
    raise TypeError(f"cannot print attribute value {value!r} of type {type(value).__name__}")


def _attr_specs(op: str) -> Mapping[str, Attr] | None:
    opdef = _OPS.get(op)
    if opdef is None:
        opdef = all_ops().get(op)
        if opdef is None:
            return None
        _OPS[op] = opdef
    return opdef.attrs


_OPS: dict[str, Any] = {}


def format_attrs(node: Node) -> str:
    """``{causal, kv_heads=2, scale=0.125}`` or ``""`` when all attrs are defaults."""
    specs = _attr_specs(node.op)
    parts = []
    for name, value in node.attrs.items():
        spec = specs.get(name) if specs is not None else None
        if spec is not None and spec.default is not REQUIRED and _same(value, spec.default):
            continue
        kind = spec.kind if spec is not None else "any"
        if value is True and kind == "bool":
            parts.append(name)
        else:
            parts.append(f"{name}={format_attr_value(kind, value)}")
    return "{" + ", ".join(parts) + "}" if parts else ""


def _same(a: Any, b: Any) -> bool:
    if type(a) is not type(b) and not (isinstance(a, int) and isinstance(b, int)):
        return False
    try:
        return bool(a == b)
    except TypeError:
        return False


def _value_ref(v: Value | None) -> str:
    return "_" if v is None else f"%{v.name}"


def _comment(node: Node, output_uses: Mapping[int, int] | None) -> str:
    parts = []
    if node.outputs:
        counts = []
        for v in node.outputs:
            n = len(v.uses)
            n += (
                output_uses.get(id(v), 0)
                if output_uses is not None
                else sum(1 for o in node.graph.outputs if o is v)
            )
            counts.append(str(n))
        parts.append("uses=" + ",".join(counts))
    source = node.meta.get("source")
    if source:
        parts.append(f"@{_one_line(source)}")
    origin = node.meta.get("origin")
    if origin:
        parts.append(f"<- {_one_line(origin)}")
    return "  # " + " ".join(parts) if parts else ""


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _node_line(node: Node, output_uses: Mapping[int, int] | None) -> str:
    outs = ", ".join(f"%{v.name}: {type_str(v.type)}" for v in node.outputs)
    ins = ", ".join(_value_ref(v) for v in node.inputs)
    attrs = format_attrs(node)
    line = f"{outs} = {node.op}({ins})" if outs else f"{node.op}({ins})"
    if attrs:
        line += " " + attrs
    return line + _comment(node, output_uses)


def _float_text(x: float, dtype: DType) -> str:
    """Shortest text that reads back to the same ``dtype`` value (via a Python float)."""
    if math.isnan(x) or math.isinf(x):
        return repr(x)
    np_type = {DType.f32: np.float32, DType.f16: np.float16}.get(dtype)
    if np_type is not None:
        short = str(np_type(x))
        try:
            if np_type(float(short)) == np_type(x):
                return short
        except ValueError:
            pass
    return repr(x)


def format_tensor_value(t: torch.Tensor) -> str:
    """Inline value of a small constant: a scalar or nested lists."""
    dtype = DType.from_torch(t.dtype)
    data = t.detach().cpu()
    if dtype in (DType.f8e4m3, DType.f8e5m2):
        data = data.float()
    values = data.tolist()

    def fmt(x: Any) -> str:
        if isinstance(x, list):
            return "[" + ", ".join(fmt(y) for y in x) + "]"
        if isinstance(x, bool):
            return "true" if x else "false"
        if isinstance(x, float):
            return _float_text(x, dtype)
        return str(x)

    return fmt(values)


def _const_line(v: Value) -> str:
    line = f"const %{v.name}: {type_str(v.type)}"
    if v.const is not None and v.const.numel() <= INLINE_MAX:
        line += " = " + format_tensor_value(v.const)
    return line


def _header(graph: Graph) -> str:
    name = graph.name if _BARE_NAME.match(graph.name or "") else json.dumps(graph.name)
    params = ", ".join(f"%{v.name}: {type_str(v.type)}" for v in graph.inputs)
    return f"graph {name}({params}) {{"


def _output_uses(graph: Graph) -> dict[int, int]:
    counts: dict[int, int] = {}
    for v in graph.outputs:
        counts[id(v)] = counts.get(id(v), 0) + 1
    return counts


# -- public --------------------------------------------------------------------


def print_node(node: Node) -> str:
    """One node as its line in the text form (no indentation)."""
    return _node_line(node, None)


def print_graph(graph: Graph) -> str:
    """The whole graph in the text form (ends with a newline)."""
    output_uses = _output_uses(graph)
    lines = [_header(graph)]
    lines.extend("  " + _const_line(v) for v in graph.constants.values())
    lines.extend("  " + _node_line(n, output_uses) for n in graph.nodes)
    lines.append(
        "  return " + ", ".join(f"%{v.name}" for v in graph.outputs)
        if graph.outputs
        else "  return"
    )
    lines.append("}")
    return "\n".join(lines) + "\n"


def print_graph_context(graph: Graph, node: Node, radius: int = 3) -> str:
    """The lines of ``radius`` nodes either side of ``node``, which is marked ``>>``."""
    output_uses = _output_uses(graph)
    nodes = list(graph.nodes)
    pos = next((i for i, n in enumerate(nodes) if n is node), None)
    if pos is None:  # not (or no longer) in the graph: show it alone
        return ">> " + _node_line(node, output_uses) + "   (not in the graph)"
    lo, hi = max(0, pos - radius), min(len(nodes), pos + radius + 1)
    lines = []
    if lo > 0:
        lines.append(f"   ... ({lo} nodes before)")
    for i in range(lo, hi):
        mark = ">> " if i == pos else "   "
        lines.append(mark + _node_line(nodes[i], output_uses))
    if hi < len(nodes):
        lines.append(f"   ... ({len(nodes) - hi} nodes after)")
    return "\n".join(lines)


__all__ = [
    "print_graph",
    "print_node",
    "print_graph_context",
    "type_str",
    "format_attr_value",
    "format_tensor_value",
    "INLINE_MAX",
]
