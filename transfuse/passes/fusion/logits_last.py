"""fusion.compute-last-logits: for generation prefill, compute the LM head on the last position only.

Runs only with the option ``logits="last"`` (``optimize(..., options={"logits": "last"})``).

Rewrites (rule id ``logits/last-position``): the graph output produced by the
LM head ``linear`` ([B, S, V]) — possibly through per-position ops after it
(a cast to fp32, a logit soft-cap) — gets ``slice(axis=1, start=S-1, end=S)``
nodes inserted as early as everything up to the head acts on each position
alone: at least before the final norm, so norm and head run on one position.
The output becomes [B, 1, V].

Before::

    %a: f32[B, S, E] = linear(%attn, %o_proj, _)     # last attention's output projection
    %h: f32[B, S, E] = add(%resid, %a)               # last residual add
    %n: f32[B, S, E] = layer_norm(%h, %w, %b)        # final norm
    %logits: f32[B, S, V] = linear(%n, %lm_head, _)
    return %logits

After::

    %r1: f32[B, 1, E] = slice(%resid) {axis=1, start=S-1, end=S}
    %t1: f32[B, 1, E] = slice(%attn) {axis=1, start=S-1, end=S}
    %a: f32[B, 1, E] = linear(%t1, %o_proj, _)
    %h: f32[B, 1, E] = add(%r1, %a)
    %n: f32[B, 1, E] = layer_norm(%h, %w, %b)
    %logits: f32[B, 1, V] = linear(%n, %lm_head, _)
    return %logits

How far back the slices go (:func:`backward_region`): from the head's input
the walk takes in the producers of the values still to be sliced, latest
first, while they are *per-position* ops (:func:`per_position_reason`:
elementwise ops whose other operands do not vary along S, norms and
reductions over the last dims, ``add_norm``, linears, splits of features...)
whose outputs nobody outside the walked region uses. Each value the walk
cannot go through gets a slice (a view: cheap). In a pre-norm Transformer
that is the residual stream and the last attention's output before its
output projection, so the last MLP runs on one position too.

Needs: a graph output produced by a ``linear`` whose output is [B, S, V]
with S the sequence dim (axis 1 of the token inputs). Refuses (near miss,
with the reason) when the output is not such a head, when S is already 1, or
when something between the head and the output mixes positions (attention,
a reduction or softmax over axis 1...).

Guarantees: the new output equals ``old_output[:, -1:, :]`` (up to GEMM
rounding for M=1 products); the output signature changes, so
``graph.meta["logits"] = "last"`` records it (the runtime reads it) and a note
says which outputs changed. Other outputs (a KV cache) are untouched.

Glossary: B batch, S sequence (query positions), E hidden size, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable

from transfuse.ir.graph import Graph, Node, Value
from transfuse.ir.opdefs.elementwise import BINARY, COMPARE, UNARY_FLOAT, UNARY_SAME
from transfuse.ir.ops import get_op
from transfuse.ir.types import Dim, TensorType, dim_str, dims_equal, normalize_dim
from transfuse.passes.base import Pass, PassContext

RULE = "logits/last-position"

#: one-input ops that act on each element alone
ELEMENTWISE_UNARY = frozenset({*UNARY_FLOAT, *UNARY_SAME, "gelu", "cast", "clamp", "logical_not",
                               "identity"})
#: ops that broadcast their operands elementwise (``rotary`` mixes along the last dim only)
ELEMENTWISE_NARY = frozenset({*BINARY, *COMPARE, "where", "swiglu", "rotary"})
#: reductions and per-axis ops with ``axes`` / ``axis`` attrs
REDUCTIONS = frozenset({"reduce_sum", "reduce_mean", "reduce_max", "reduce_min"})
AXIS_OPS = frozenset({"softmax", "log_softmax", "argmax", "cumsum"})
#: normalisations over the last ``normalized_ndim`` dims, and where their parameters start
NORMS = {"layer_norm": 1, "rms_norm": 1, "add_norm": 2}


class ComputeLastLogits(Pass):
    """Slice the hidden state to the last position before the final norm and LM head."""

    name = "fusion.compute-last-logits"
    rules = (RULE,)
    #: the output signature changes ([B, S, V] -> [B, 1, V]); the manager must not compare
    #: outputs with the graph before the pass
    changes_function = True

    def run(self, graph: Graph, ctx: PassContext) -> None:
        mode = ctx.option("logits")
        if mode in (None, "all"):
            return
        if mode != "last":
            raise ValueError(f"option logits={mode!r}: expected 'last' or 'all'")
        ctx.attempt(RULE)
        seq = _seq_dim(graph)
        heads: list[Node] = []
        reasons: list[str] = []
        for i, out in enumerate(graph.outputs):
            head = _find_head(out)
            if head is None:
                reasons.append(f"output {i} (%{out.name}) is not computed from a linear")
            elif head not in heads:
                heads.append(head)
        if not heads:
            ctx.near_miss(RULE, None, "no LM head: " + "; ".join(reasons))
            return
        refused: list[tuple[Node, str]] = []
        converted: list[Node] = []
        for head in heads:
            reason = self._check_head(head, seq)
            if reason:
                refused.append((head, reason))
                continue
            converted.append(head)
            self._slice_before(graph, ctx, head)
        if not converted:  # why-not matters only when no head was converted (not for KV caches)
            for head, reason in refused:
                ctx.near_miss(RULE, head, reason)
            return
        graph.meta["logits"] = "last"
        made = {id(v) for h in converted for n in [h, *_descendants(h)] for v in n.outputs}
        changed = [f"%{v.name}: {v.type}" for v in graph.outputs if id(v) in made]
        ctx.note("logits=last: the LM head runs on the last position only; outputs now "
                 + ", ".join(changed) + " (graph.meta['logits'] = 'last')")

    # -- checks --------------------------------------------------------------

    def _check_head(self, head: Node, seq: Dim | None) -> str | None:
        out = head.output
        if out.type.rank != 3:
            return f"LM head output {out.type} is not [B, S, V]"
        s = out.type.shape[1]
        if seq is not None and not dims_equal(s, seq):
            return (f"LM head output {out.type}: axis 1 ({dim_str(s)}) is not the sequence dim "
                    f"{dim_str(seq)}")
        if s == 1:
            return "LM head output already has one position (S = 1)"
        after = _descendants(head)
        carried = {id(v) for n in [head, *after] for v in n.outputs}
        for n in after:
            reason = per_position_reason(n, lambda v: id(v) in carried)
            if reason:
                return f"{n.op} after the LM head mixes positions: {reason}"
            for v in n.outputs:
                if v.type.rank < 2 or not dims_equal(v.type.shape[1], s):
                    return f"{n.op} after the LM head changes the layout to {v.type}"
        return None

    # -- the rewrite ---------------------------------------------------------

    def _slice_before(self, graph: Graph, ctx: PassContext, head: Node) -> None:
        def last_position(h: Value, first: Node) -> Node:
            s = h.type.shape[1]
            source = first.source or head.source
            return graph.create("slice", [h], {"axis": 1, "start": normalize_dim(s - 1),
                                               "end": s}, before=first, name="last_position",
                                meta={"source": source} if source else None)

        entries, region, made = cut_before_head(
            head, _seq_dependent_fn(head.output.type), last_position)
        ctx.rewrite(RULE, [head], made)
        where = ", ".join(f"%{h.name}" for h in entries)
        ctx.note(f"logits=last: sliced {where} to the last position; {len(region)} per-position "
                 f"nodes and the LM head run on it (from {made[0].source or '?'})")


# -- regions ---------------------------------------------------------------------


def cut_before_head(head: Node, dependent: Callable[[Value], bool],
                    make: Callable[[Value, Node], Node]) -> tuple[list[Value], list[Node],
                                                                  list[Node]]:
    """Cut the positions the LM head ``head`` computes as early as possible.

    Walks back from the head's input through per-position nodes (:func:`backward_region`),
    puts ``make(entry, first_user)`` (a node selecting positions of ``entry``, inserted
    before its first user in the region) on every entry value, rewires the region and the
    head to it, and re-infers the types of the region, the head and what follows it.
    Returns (entries, region, made nodes).
    """
    graph = head.graph
    entries, region = backward_region(
        head.inputs[0], head, lambda n: per_position_reason(n, dependent) is None, dependent)
    users = [*region, head]
    made = []
    for h in entries:
        first = next(n for n in users if any(v is h for v in n.inputs))
        node = make(h, first)
        for n in users:
            for i, v in enumerate(n.inputs):
                if v is h:
                    graph.set_input(n, i, node.output)
        made.append(node)
    retype([*region, head, *_descendants(head)])
    return entries, region, made


def backward_region(end: Value, sink: Node, allowed: Callable[[Node], bool],
                    dependent: Callable[[Value], bool]) -> tuple[list[Value], list[Node]]:
    """The nodes that compute ``end`` (an input of ``sink``) from ``dependent`` entry values
    through ``allowed`` nodes, walking back as far as possible.

    The walk keeps a frontier of dependent values still to reach (starting with
    ``end``) and replaces the one produced last by its producer's dependent
    inputs, as long as that producer is ``allowed``, has a dependent input, and
    its outputs are used only by ``sink`` and the nodes walked so far (never by
    a graph output); a value that cannot be walked through stays an entry.
    Non-dependent inputs (weights, per-feature constants) are not followed.
    Returns the entries (the final frontier, in graph order) and the walked
    nodes in graph order; with no step possible, ``([end], [])``.
    """
    graph = end.graph
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    outputs = {id(v) for v in graph.outputs}

    def position(v: Value) -> int:
        return -1 if v.producer is None else order.get(id(v.producer), -1)

    frontier: dict[int, Value] = {id(end): end}
    blocked: set[int] = set()
    region: list[Node] = []
    inside: set[int] = {id(sink)}
    while True:
        open_ = [v for v in frontier.values() if id(v) not in blocked]
        if not open_:
            break
        latest = max(open_, key=position)
        node = latest.producer
        deps = [] if node is None else [v for v in node.inputs if v is not None and dependent(v)]
        if node is None or not deps or not allowed(node) or any(
                id(v) in outputs or any(id(u) not in inside for u, _ in v.uses)
                for v in node.outputs):
            blocked.add(id(latest))
            continue
        region.append(node)
        inside.add(id(node))
        for v in node.outputs:
            frontier.pop(id(v), None)
        for v in deps:
            frontier[id(v)] = v
    entries = sorted(frontier.values(), key=position)
    return entries, sorted(region, key=lambda x: order[id(x)])


def retype(nodes: list[Node]) -> None:
    """Re-infer the output types of ``nodes`` (given in graph order) after their inputs changed."""
    for n in nodes:
        for v, t in zip(n.outputs, get_op(n.op).infer_types(n)):
            v.type = t


# -- what acts per position ------------------------------------------------------


def per_position_reason(node: Node, sliced: Callable[[Value], bool]) -> str | None:
    """Why ``node`` may mix positions (axis 1); None when it acts on each position alone."""
    return independence_reason(node, 1, sliced)


def independence_reason(node: Node, axis: int, carried: Callable[[Value], bool]) -> str | None:
    """Why ``node`` may mix entries along ``axis`` of its output (None when it does not).

    ``carried(v)`` says whether input ``v`` carries that axis (at the same index,
    same rank); every other input must not vary along it (weights, a RoPE table
    broadcast over heads, a per-feature scale). Used per position (axis 1 of
    [B, S, E]) by this pass and per head (axis 1 of [B, H, T, D]) by
    ``convert.mha-to-gqa``.
    """
    op = node.op
    if not node.outputs:
        return f"{op} has no outputs"
    rank = node.outputs[0].type.rank
    if rank <= axis:
        return f"{op} output {node.outputs[0].type} has no axis {axis}"
    if op in ELEMENTWISE_UNARY or op == "dropout" and not node.attr("train"):
        return None
    if op in ELEMENTWISE_NARY:
        if op == "rotary" and axis == rank - 1:
            return f"rotary mixes along the last axis {axis}"
        for v in node.inputs:
            if v is None:
                continue
            if carried(v):
                if v.type.rank != rank:
                    return f"operand %{v.name} {v.type} is broadcast along axis {axis}"
            elif _varies_along(v, axis, rank):
                return f"operand %{v.name} {v.type} varies along axis {axis}"
        return None
    if op in NORMS:
        if rank - node.attrs["normalized_ndim"] <= axis:
            return f"{op} normalises over axis {axis}"
        for v in node.inputs[:NORMS[op]]:  # add_norm: x and residual, broadcast elementwise
            if v is not None and not carried(v) and _varies_along(v, axis, rank):
                return f"operand %{v.name} {v.type} varies along axis {axis}"
        return _params_constant(node, NORMS[op])
    if op in HEAD_OPS:
        if op == "qmatmul" and node.attrs["act_quant"] != "token":
            return "qmatmul quantizes its activations with one scale over all positions"
        return _params_constant(node, 1) if rank - 1 > axis else f"{op} works along axis {axis}"
    if op == "matmul":
        b = node.inputs[1]
        if rank - 1 > axis and node.inputs[0].type.rank == rank and b.type.rank == 2 and b.is_const:
            return None
        return "matmul with a non-constant or batched right operand"
    if op in REDUCTIONS:
        in_rank = node.inputs[0].type.rank
        axes = {a % in_rank for a in node.attrs["axes"]} or set(range(in_rank))
        if axis in axes or not node.attrs["keepdim"] and min(axes) < axis:
            return f"{op} reduces over axes {sorted(axes)}"
        return None
    if op in AXIS_OPS:
        in_rank = node.inputs[0].type.rank
        a = node.attrs["axis"] % in_rank
        if a == axis or op == "argmax" and not node.attrs["keepdim"] and a < axis:
            return f"{op} works along axis {node.attrs['axis']}"
        return None
    if op in ("slice", "split"):
        return f"{op} along axis {axis}" if node.attrs["axis"] % rank == axis else None
    if op == "concat":
        if node.attrs["axis"] % rank == axis:
            return f"concat along axis {axis}"
        if not all(carried(v) for v in node.inputs):
            return "concat of a value that does not carry the axis"
        return None
    return f"{op} is not known to work on each entry of axis {axis} alone"


def _params_constant(node: Node, first: int) -> str | None:
    for v in node.inputs[first:]:
        if v is not None and not v.is_const:
            return f"{node.op} parameter %{v.name} is not a constant"
    return None


def _varies_along(v: Value, axis: int, rank: int) -> bool:
    """Whether ``v`` (broadcast to ``rank``) has a non-1 size at ``axis``."""
    aligned = axis - (rank - v.type.rank)
    return aligned >= 0 and v.type.shape[aligned] != 1


def _seq_dependent_fn(t: TensorType) -> Callable[[Value], bool]:
    """Values that carry the positions: computed, of the head output's rank, with S at axis 1."""
    rank, s = t.rank, t.shape[1]

    def dependent(v: Value) -> bool:
        return not v.is_const and v.type.rank == rank and dims_equal(v.type.shape[1], s)
    return dependent


def _descendants(head: Node) -> list[Node]:
    """Nodes computed from ``head``'s outputs, in graph order."""
    reach: set[int] = {id(head)}
    out = []
    started = False
    for n in head.graph.nodes:
        if n is head:
            started = True
            continue
        if started and any(v is not None and v.producer is not None and id(v.producer) in reach
                           for v in n.inputs):
            reach.add(id(n))
            out.append(n)
    return out


#: ops that can be an LM head: a GEMM by a constant weight (float or quantized)
HEAD_OPS = ("linear", "qlinear", "qmatmul")


def _find_head(out: Value) -> Node | None:
    """The ``linear`` (or quantized ``qlinear`` / ``qmatmul``; constant weight) that graph
    output ``out`` is computed from, following nodes with a single non-constant input; whether
    those act per position is checked later."""
    v = out
    while v.producer is not None:
        n = v.producer
        if n.op in HEAD_OPS:
            return n if n.inputs[1].is_const else None
        dep = [x for x in n.inputs if x is not None and not x.is_const]
        if len(dep) != 1:
            return None
        v = dep[0]
    return None


def _seq_dim(graph: Graph) -> Dim | None:
    """The sequence dim: axis 1 of the first graph input of rank >= 2 (token ids)."""
    for v in graph.inputs:
        if v.type.rank >= 2:
            return v.type.shape[1]
    return None


__all__ = ["ComputeLastLogits", "backward_region", "cut_before_head", "per_position_reason",
           "independence_reason", "retype"]
