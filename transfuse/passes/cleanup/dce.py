"""cleanup.eliminate-dead-code: remove what no output depends on.

Rewrites (rule ids):

- ``dce/node``: a pure node (``OpDef.pure``; see :func:`~transfuse.passes.base.is_pure`)
  none of whose outputs is used by a node or a graph output is erased; one
  sweep in reverse order removes whole dead chains;
- ``dce/constant``: constants nothing uses are dropped from the graph.

Needs: nothing. Guarantees: impure nodes (``assert``, training ``dropout``,
random or in-place fallbacks, ops that write inputs in place such as
``cached_attention``: ``OpDef.mutates``) stay even when unused; graph inputs stay (they
are the signature); outputs are unchanged.
"""

from __future__ import annotations

from transfuse.ir.graph import Graph
from transfuse.passes.base import Pass, PassContext, is_pure


class EliminateDeadCode(Pass):
    """Erase pure nodes whose outputs are unused, and unused constants."""

    name = "cleanup.eliminate-dead-code"
    rules = ("dce/node", "dce/constant")

    def run(self, graph: Graph, ctx: PassContext) -> None:
        graph_outputs = {id(v) for v in graph.outputs}
        for node in reversed(graph.nodes):
            if any(v.uses or id(v) in graph_outputs for v in node.outputs):
                continue
            ctx.attempt("dce/node")
            if not is_pure(node):
                continue
            ctx.rewrite("dce/node", [node])
            graph.erase(node)
        dropped = graph.remove_unused_constants()
        if dropped:
            ctx.attempt("dce/constant", dropped)
            ctx.count("dce/constant", dropped)
