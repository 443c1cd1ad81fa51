"""cleanup.fold-views: collapse chains of view ops into one.

Rewrites (rule ids):

- ``views/reshape-reshape``: ``reshape(reshape(x, s1), s2)`` -> ``reshape(x, s2)``;
  squeeze/unsqueeze chains are reshapes and fold the same way;
- ``views/permute-permute``: ``permute(permute(x, p1), p2)`` -> ``permute(x, p)``
  with ``p[i] = p1[p2[i]]``;
- ``views/expand-expand``: ``expand(expand(x, s1), s2)`` -> ``expand(x, s2)``;
- ``views/permute-as-reshape``: a permute that only moves size-1 dims (the
  other dims keep their order) is a ``reshape`` (folded into a reshape before it);
- a fold whose result has the type of ``x`` forwards ``x`` itself (the chain
  was the identity, e.g. transpose twice) under the same rule id.

Views are free, so the inner view is folded even when it has other users:
it stays for them; when it has no users left it is erased.

Needs: nothing. Guarantees: the same values (views only move or relabel
elements); new nodes are placed where the outer view was.
"""

from __future__ import annotations

from transfuse.ir.graph import Graph, Node, Value
from transfuse.passes.base import Pass, PassContext, erase_if_dead


def _producer(v: Value | None, op: str) -> Node | None:
    if v is None or v.producer is None or v.producer.op != op:
        return None
    return v.producer


def _moves_only_unit_dims(x: Value, perm: tuple[int, ...]) -> bool:
    kept = [p for p in perm if x.type.shape[p] != 1]
    return kept == sorted(kept)


class FoldViews(Pass):
    """Fold reshape/permute/expand chains into single views; permutes of size-1
    dims become reshapes; identity chains disappear."""

    name = "cleanup.fold-views"
    rules = ("views/reshape-reshape", "views/permute-permute", "views/expand-expand",
             "views/permute-as-reshape")

    #: a sweep folds whole chains; another one catches reshapes made from permutes
    max_sweeps = 4

    def run(self, graph: Graph, ctx: PassContext) -> None:
        for _ in range(self.max_sweeps):
            folds = sum(self._visit(graph, ctx, node) for node in graph.nodes)
            if not folds:
                break

    def _visit(self, graph: Graph, ctx: PassContext, node: Node) -> bool:
        if node.op == "permute":
            x, p2 = node.inputs[0], node.attrs["perm"]
            inner = _producer(x, "permute")
            if inner is not None:
                p1 = inner.attrs["perm"]
                return self._replace(graph, ctx, "views/permute-permute", node, inner,
                                     "permute", {"perm": tuple(p1[i] for i in p2)})
            if _moves_only_unit_dims(x, p2):
                return self._replace(graph, ctx, "views/permute-as-reshape", node,
                                     _producer(x, "reshape"), "reshape",
                                     {"shape": node.output.type.shape})
        elif node.op in ("reshape", "expand"):
            inner = _producer(node.inputs[0], node.op)
            if inner is not None:
                return self._replace(graph, ctx, f"views/{node.op}-{node.op}", node, inner,
                                     node.op, {"shape": node.attrs["shape"]})
        return False

    def _replace(self, graph: Graph, ctx: PassContext, rule: str, outer: Node,
                 inner: Node | None, op: str, attrs: dict) -> bool:
        """Replace ``outer`` by ``op(x, attrs)`` where x is the input of the chain."""
        ctx.attempt(rule)
        x = (inner or outer).inputs[0]
        matched = [outer] if inner is None else [inner, outer]
        identity = x.type == outer.output.type and (
            op != "permute" or list(attrs["perm"]) == sorted(attrs["perm"]))
        if identity:
            ctx.rewrite(rule, matched)
            graph.replace_all_uses(outer.output, x)
        else:
            new = graph.create(op, [x], attrs, before=outer, meta=dict(outer.meta))
            ctx.rewrite(rule, matched, [new])
            graph.replace_all_uses(outer.output, new.output)
        graph.erase(outer)
        erase_if_dead(graph, inner)
        return True
