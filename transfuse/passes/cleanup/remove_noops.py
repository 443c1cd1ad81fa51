"""cleanup.remove-noops: forward the input of nodes that do nothing.

Rewrites (rule ids):

- ``noop/dropout``: inference dropout (``train=False`` or ``p=0``) -> its input;
- ``noop/identity``: ``identity(x)`` -> ``x``;
- ``noop/cast``: ``cast`` to the dtype ``x`` already has;
- ``noop/reshape``, ``noop/expand``: to the shape ``x`` already has;
- ``noop/permute``: the identity permutation;
- ``noop/slice``: ``start=0``, ``step=1`` and ``end >= dim`` (the whole dim);
- ``noop/add-zero``, ``noop/sub-zero``, ``noop/mul-one``, ``noop/div-one``: with a
  small constant of all zeros / ones, only when the result has exactly the
  type of ``x`` (no broadcast, no dtype promotion);
- ``noop/assert``: runtime asserts from capture are dropped; the shape checks
  they hold are enforced by the CompiledModel's signature check on every call.

Needs: nothing. Guarantees: the graph computes bit-identical outputs
(``x + 0.0`` may turn ``-0.0`` into ``+0.0``, which compares equal); every
forwarded value has the exact type of the node's output.
"""

from __future__ import annotations

from transfuse.ir.graph import Graph, Node, Value
from transfuse.ir.opdefs.shape import INT64_MAX
from transfuse.ir.types import dims_equal
from transfuse.passes.base import Pass, PassContext, forward_to

#: constants scanned for all-zeros / all-ones: scalars only. A weight that happens to be all
#: ones (a freshly initialised norm) is still a weight: removing it would make the graph
#: depend on the values of one checkpoint and hide the multiply from pattern rules.
MAX_SCAN = 1


def _const_all(v: Value | None, value: float) -> bool:
    if v is None or v.const is None or v.const.numel() > MAX_SCAN or v.const.numel() == 0:
        return False
    return bool((v.const == value).all())


def _same_type(node: Node, x: Value) -> bool:
    return node.output.type == x.type


def _slice_whole(node: Node) -> bool:
    a, x = node.attrs, node.inputs[0]
    if a["step"] != 1 or a["start"] != 0:
        return False
    dim = x.type.shape[a["axis"] % x.type.rank]
    end = a["end"]
    if isinstance(end, int) and (end >= INT64_MAX // 2 or (isinstance(dim, int) and end >= dim)):
        return True
    return dims_equal(end, dim)


def _noop_input(node: Node) -> tuple[str, Value | None]:
    """(rule, value the node's output equals) or (rule or "", None) when not a no-op."""
    op, ins = node.op, node.inputs
    if op == "dropout":
        return "noop/dropout", ins[0] if (not node.attrs["train"] or node.attrs["p"] == 0.0) else None
    if op == "identity":
        return "noop/identity", ins[0]
    if op in ("cast", "reshape", "expand"):
        return f"noop/{op}", ins[0] if _same_type(node, ins[0]) else None
    if op == "permute":
        perm = node.attrs["perm"]
        return "noop/permute", ins[0] if list(perm) == list(range(len(perm))) else None
    if op == "slice":
        return "noop/slice", ins[0] if _slice_whole(node) and _same_type(node, ins[0]) else None
    if op in ("add", "mul"):
        neutral = 0.0 if op == "add" else 1.0
        rule = "noop/add-zero" if op == "add" else "noop/mul-one"
        for x, c in ((ins[0], ins[1]), (ins[1], ins[0])):
            if _const_all(c, neutral) and _same_type(node, x):
                return rule, x
        return rule, None
    if op in ("sub", "div"):
        neutral = 0.0 if op == "sub" else 1.0
        rule = "noop/sub-zero" if op == "sub" else "noop/div-one"
        ok = _const_all(ins[1], neutral) and _same_type(node, ins[0])
        return rule, ins[0] if ok else None
    return "", None


class RemoveNoops(Pass):
    """Forward the input of no-op nodes (inference dropout, identity, same-type
    cast/reshape/expand, identity permute, whole slice, +0/*1) and drop capture asserts."""

    name = "cleanup.remove-noops"
    rules = ("noop/dropout", "noop/identity", "noop/cast", "noop/reshape", "noop/expand",
             "noop/permute", "noop/slice", "noop/add-zero", "noop/sub-zero", "noop/mul-one",
             "noop/div-one", "noop/assert")

    def run(self, graph: Graph, ctx: PassContext) -> None:
        asserts = 0
        for node in graph.nodes:
            if node.op == "assert":
                ctx.attempt("noop/assert")
                ctx.rewrite("noop/assert", [node])
                graph.erase(node)
                asserts += 1
                continue
            rule, x = _noop_input(node)
            if not rule:
                continue
            ctx.attempt(rule)
            if x is None:
                continue
            ctx.rewrite(rule, [node])
            forward_to(graph, node, x)
        if asserts:
            ctx.note(f"removed {asserts} runtime assert{'s' if asserts != 1 else ''} from capture; "
                     f"input shapes are enforced by the compiled model's signature check")
