"""Structural and type verification of a graph.

Checks: every value is defined before use (SSA, topological order), use lists
match the inputs that refer to them, node attrs match the op schema, output
types match what the op infers, and each op's own ``verify``. Errors show the
node and the printed lines around it.
"""

from __future__ import annotations

from transfuse.errors import IRVerifyError, TransfuseError
from transfuse.ir.graph import Graph, Node
from transfuse.ir.ops import get_op


def verify(graph: Graph, *, check_types: bool = True) -> None:
    """Raise :class:`IRVerifyError` at the first broken invariant."""
    defined: set[int] = {id(v) for v in graph.inputs} | {id(v) for v in graph.constants.values()}
    for v in graph.constants.values():
        if v.const is None:
            _fail(graph, None, f"constant %{v.name} has no payload")
    names: set[str] = set()
    for v in graph.values():
        if v.name in names:
            _fail(graph, v.producer, f"value name %{v.name} is defined twice")
        names.add(v.name)
    for node in graph.nodes:
        if node.graph is not graph:
            _fail(graph, node, "node belongs to another graph")
        try:
            opdef = get_op(node.op)
        except TransfuseError as e:
            _fail(graph, node, str(e))
        reason = opdef.check_arity(node)
        if reason:
            _fail(graph, node, reason)
        for i, v in enumerate(node.inputs):
            if v is None:
                continue
            if id(v) not in defined:
                _fail(graph, node, f"input {i} %{v.name} is used before it is defined (or is not in the graph)")
            if (node, i) not in v.uses:
                _fail(graph, node, f"use list of %{v.name} misses ({node.op}, {i})")
        try:
            normalized = opdef.normalize_attrs(node.attrs, node.op)
        except TransfuseError as e:
            _fail(graph, node, str(e))
        if normalized != node.attrs:
            _fail(graph, node, f"attrs {node.attrs} are not normalized ({normalized})")
        if check_types and opdef.infer is not None:
            try:
                inferred = opdef.infer(node)
            except TransfuseError as e:
                _fail(graph, node, f"type inference failed: {e}")
            actual = [v.type for v in node.outputs]
            if list(inferred) != actual:
                _fail(graph, node, f"output types {actual} differ from inferred {list(inferred)}")
        if opdef.verify is not None:
            reason = opdef.verify(node)
            if reason:
                _fail(graph, node, reason)
        for j, v in enumerate(node.outputs):
            if v.producer is not node or v.index != j:
                _fail(graph, node, f"output %{v.name} does not point back to its producer")
            for user, k in v.uses:
                if user.is_erased or user.inputs[k] is not v:
                    _fail(graph, node, f"stale use of %{v.name} by {user!r}")
            defined.add(id(v))
    for j, v in enumerate(graph.outputs):
        if id(v) not in defined:
            _fail(graph, None, f"graph output {j} %{v.name} is not defined in the graph")


def _fail(graph: Graph, node: Node | None, reason: str) -> None:
    context = ""
    if node is not None:
        try:
            from transfuse.ir.printer import print_graph_context

            context = "\n" + print_graph_context(graph, node)
        except Exception:  # noqa: BLE001 - printing must never mask the real error
            context = f"\n  at {node!r}"
        where = f" (from {node.source})" if node.source else ""
        raise IRVerifyError(f"IR verify failed at {node!r}{where}: {reason}{context}")
    raise IRVerifyError(f"IR verify failed: {reason}")
