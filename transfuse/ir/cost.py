"""Static cost model: floating-point work and memory traffic per node and per graph.

Each op declares its cost in its :class:`~transfuse.ir.opdef.OpDef` (``cost(node)
-> (flops, bytes)``; ops without one move their inputs and outputs and do no
arithmetic). Costs are symbolic in the graph's dims (``batch``, ``seq``) until
an ``env`` binds them. Bytes are a no-reuse estimate: every input read once,
every output written once (view ops such as ``reshape`` included, as an
unfused program would), so fusion shows up as a drop in bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import sympy

from transfuse.ir.graph import Graph, Node
from transfuse.ir.ops import get_op
from transfuse.ir.types import Dim, eval_dim, normalize_dim


def node_cost(node: Node) -> tuple[Dim, Dim]:
    """``(flops, bytes)`` of one node, symbolic when its types are."""
    flops, nbytes = get_op(node.op).node_cost(node)
    return _dim(flops), _dim(nbytes)


def graph_cost(graph: Graph, env: Mapping[str, int] | None = None) -> dict[str, Any]:
    """Totals and a per-op breakdown of a graph's cost.

    Returns ``{"flops", "bytes", "nodes", "by_op": {op: {"count", "flops", "bytes"}}}``
    with ops ordered by decreasing flops. Values are symbolic expressions (or ints
    when they do not depend on a symbol) without ``env``, ints with it.
    """
    terms: dict[str, tuple[list, list]] = {}
    counts: dict[str, int] = {}
    for node in graph.nodes:
        flops, nbytes = node_cost(node)
        f, b = terms.setdefault(node.op, ([], []))
        f.append(flops)
        b.append(nbytes)
        counts[node.op] = counts.get(node.op, 0) + 1
    by_op: dict[str, dict[str, Any]] = {}
    for op, (f, b) in terms.items():
        by_op[op] = {"count": counts[op], "flops": _total(f, env), "bytes": _total(b, env)}
    total_flops = _total([v["flops"] for v in by_op.values()], None)
    total_bytes = _total([v["bytes"] for v in by_op.values()], None)
    order = sorted(by_op, key=lambda op: _sort_key(by_op[op]["flops"], env), reverse=True)
    return {
        "flops": total_flops,
        "bytes": total_bytes,
        "nodes": len(graph),
        "by_op": {op: by_op[op] for op in order},
    }


def _dim(x: Any) -> Dim:
    """An op's cost as an int or a sympy expression of the graph's symbols."""
    if isinstance(x, int):
        return x
    return normalize_dim(x if isinstance(x, sympy.Basic) else sympy.sympify(x))


def _total(xs: list, env: Mapping[str, int] | None) -> Dim:
    ints = sum(x for x in xs if isinstance(x, int))
    syms = [x for x in xs if not isinstance(x, int)]
    if not syms:
        return ints
    total = normalize_dim(sympy.Add(ints, *syms))
    return total if env is None else eval_dim(total, env)


def _sort_key(x: Dim, env: Mapping[str, int] | None) -> float:
    if isinstance(x, int):
        return float(x)
    # symbolic: rank by the value at a moderate size of every symbol
    return float(x.subs({s: 512 for s in x.free_symbols}))


__all__ = ["node_cost", "graph_cost"]
