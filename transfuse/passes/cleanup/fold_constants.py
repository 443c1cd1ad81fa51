"""cleanup.fold-constants: evaluate at compile time what does not depend on inputs.

Rewrites (rule ids):

- ``fold/shape-of``: ``shape_of(x) {axis}`` where that dim of ``x`` is a
  static int becomes an i64 constant (``x`` need not be constant); with a
  symbolic dim the node stays;
- ``fold/constant``: a pure node whose inputs are all constants (or that has
  none, like ``arange``/``full`` with static attrs), whose attrs hold no
  symbolic dims and whose outputs are static and small (at most
  ``max_elements`` elements each, option ``max_elements``, default
  :data:`MAX_ELEMENTS`) is run with the op's reference implementation and
  replaced by constants. Shape arithmetic on folded constants folds in turn.

Never folded: impure ops (``assert``, training ``dropout``, ops that write inputs
in place: ``OpDef.mutates``), ``torch_fallback``
(opaque), nodes whose attrs hold symbolic dims (``reshape``/``expand``/``full``/
``arange`` over ``seq`` stay as they are: they are cheap and shape-generic), and
outputs over the size limit (a folded ``expand`` of a bias would turn a view
into a weight-sized tensor). Whatever ``max_elements`` says, an output over the
limit of :mod:`transfuse.ir.limits` (``max_tensor_bytes()``, 2 GiB by default) is
never materialised: the size is checked from the declared type before anything is
allocated (a hostile 16 GiB ``arange`` stays a node). A refused all-constant node
is a near miss with its reason (the output, its type and its size in bytes).

Needs: nothing. Guarantees: folded values are what the reference interpreter
computes for the node, with the node's declared type.
"""

from __future__ import annotations

from typing import Any

import torch

from transfuse.ir.graph import Graph, Node, Value
from transfuse.ir.limits import oversize_reason, tensor_bytes
from transfuse.ir.ops import run_reference
from transfuse.ir.types import TensorType, free_symbols
from transfuse.passes.base import Pass, PassContext, is_pure

#: default limit on the elements of each folded output
MAX_ELEMENTS = 4096

_NEVER_FOLD = frozenset({"torch_fallback"})


def _attrs_symbolic(attrs: dict[str, Any]) -> bool:
    def has(v: Any) -> bool:
        if isinstance(v, (list, tuple)):
            return any(has(x) for x in v)
        return hasattr(v, "free_symbols") and bool(v.free_symbols)

    return any(has(v) for v in attrs.values())


def _static_numel(t: TensorType) -> int | None:
    if free_symbols(t.shape):
        return None
    n = 1
    for d in t.shape:
        n *= d
    return n


class FoldConstants(Pass):
    """Replace nodes computable at compile time (all-constant inputs, static
    shape_of) by constants, within a size limit."""

    name = "cleanup.fold-constants"
    rules = ("fold/shape-of", "fold/constant")

    def run(self, graph: Graph, ctx: PassContext) -> None:
        limit = int(ctx.option("max_elements", MAX_ELEMENTS))
        made: list[Value] = []
        for node in graph.nodes:
            if node.op == "shape_of":
                made += self._shape_of(graph, ctx, node)
            elif node.outputs and all(v is None or v.is_const for v in node.inputs):
                made += self._fold(graph, ctx, node, limit)
        # intermediate results folded further are not kept (the graph's own constants are
        # left to dead code elimination)
        outputs = {id(v) for v in graph.outputs}
        for c in made:
            if not c.uses and id(c) not in outputs:
                del graph.constants[c.name]

    def _shape_of(self, graph: Graph, ctx: PassContext, node: Node) -> list[Value]:
        ctx.attempt("fold/shape-of")
        x = node.inputs[0]
        dim = x.type.shape[node.attrs["axis"] % max(x.type.rank, 1)]
        if not isinstance(dim, int):
            return []  # symbolic: stays a runtime value
        c = graph.add_constant(torch.tensor(dim, dtype=torch.int64), f"{x.name}_dim")
        ctx.rewrite("fold/shape-of", [node])
        graph.replace_all_uses(node.output, c)
        graph.erase(node)
        return [c]

    def _fold(self, graph: Graph, ctx: PassContext, node: Node, limit: int) -> list[Value]:
        if node.op in _NEVER_FOLD or not is_pure(node):
            return []
        ctx.attempt("fold/constant")
        if _attrs_symbolic(node.attrs):
            return []  # shape-generic by design: keep
        for v in node.outputs:  # sizes from the declared types: nothing is allocated yet
            n = _static_numel(v.type)
            if n is None:
                return []
            too_big = oversize_reason(n, v.dtype)
            if too_big:
                ctx.near_miss("fold/constant", node,
                              f"output %{v.name} {v.type} not materialised: {too_big}")
                return []
            if n > limit:
                ctx.near_miss("fold/constant", node,
                              f"all inputs are constant but output %{v.name} has {n} elements "
                              f"> limit {limit} (option max_elements), "
                              f"{tensor_bytes(n, v.dtype)} bytes")
                return []
        args = [None if v is None else v.const for v in node.inputs]
        try:
            with torch.no_grad():
                outs = run_reference(node, args, {})
        except Exception as e:  # noqa: BLE001 - a refusal with its reason
            ctx.near_miss("fold/constant", node, f"reference evaluation failed: {e}")
            return []
        if len(outs) != len(node.outputs):
            ctx.near_miss("fold/constant", node, "reference returned a different output count")
            return []
        for v, t in zip(node.outputs, outs):
            if not isinstance(t, torch.Tensor) or TensorType.of(t) != v.type:
                got = TensorType.of(t) if isinstance(t, torch.Tensor) else type(t).__name__
                ctx.near_miss("fold/constant", node,
                              f"reference gave {got} for %{v.name} declared {v.type}")
                return []
        ctx.rewrite("fold/constant", [node])
        made = []
        for v, t in zip(node.outputs, outs):
            made.append(graph.add_constant(t.detach().clone().contiguous(), f"{v.name}_c"))
            graph.replace_all_uses(v, made[-1])
        graph.erase(node)
        return made
