"""Residual add + norm -> ``add_norm``; bias add and activation -> ``linear``'s epilogue.

Glossary: E the hidden (normalised) size, N a linear's output features, K its input
features.

``recognize.fuse-add-norm`` — rules ``residual/add-layer-norm``, ``residual/add-rms-norm``:
``norm(x + residual)`` -> ``add_norm(x, residual, weight, bias) {kind, eps, ...}`` with
two outputs ``(normed, sum)``. In a pre-norm Transformer the sum is also the next
residual, so unlike an ordinary rule the add may (and usually does) have users outside
the match: they are moved to output 1. The fused node goes before the first user of the
sum, and its parameters must be computed before that point (otherwise a near miss).

``recognize.fold-linear-epilogue`` — rules ``residual/linear-bias``: ``linear(x, w) + b``
with ``b`` of shape [N] -> ``linear(x, w, b)``; ``residual/linear-activation``:
``gelu|silu|relu(linear(...))`` -> ``linear(...) {activation}`` (``gelu``, ``gelu_tanh``,
``silu``, ``relu``) when the activation is the linear's only user.

Needs: ``recognize.fuse-norms`` and ``recognize.fuse-activations`` first (they make the
norms and activations these rules look for; swiglu must claim silu before the epilogue
fold). Guarantees: the fused ops compute the same function (a bias inside the GEMM may
round differently from a separate add).
"""

from __future__ import annotations

from transfuse.ir.graph import Graph, Node
from transfuse.ir.types import dims_equal
from transfuse.passes.base import PassContext, erase_if_dead
from transfuse.passes.recognize._common import op_with_optional
from transfuse.passes.registry import register_pass
from transfuse.passes.rewrite import (
    Match,
    P,
    RewritePass,
    Rule,
    match,
    match_failure,
    record_near_miss,
)

# -- add_norm -------------------------------------------------------------------------------

_sum = P.op("add", P.any("x"), P.any("residual"), name="sum")


def _norm_attrs(m: Match) -> dict:
    norm = m.node("norm")
    kind = "layer" if norm.op == "layer_norm" else "rms"
    return {"kind": kind, **norm.attrs}


ADD_LAYER_NORM = Rule(
    id="residual/add-layer-norm",
    pattern=op_with_optional("layer_norm", [_sum], ["w", "b"], name="norm"),
    replace=lambda m, b: None,  # applied by FuseAddNorm (a shared intermediate)
)
ADD_RMS_NORM = Rule(
    id="residual/add-rms-norm",
    pattern=op_with_optional("rms_norm", [_sum], ["w"], name="norm"),
    replace=lambda m, b: None,
)


def _positions(graph: Graph) -> dict[int, int]:
    return {id(n): i for i, n in enumerate(graph.nodes)}


def _try_add_norm(rule: Rule, node: Node, graph: Graph, ctx: PassContext, seen: set) -> bool:
    """Match ``rule`` at the norm ``node``; build ``add_norm`` and move the sum's other users
    to its second output. Returns True on a rewrite."""
    ctx.attempt(rule.id)
    m, fail = match(rule.pattern, node)
    reason, where = match_failure(rule, m, fail, node)
    if m is None and reason is None:
        return False
    if m is not None:
        reason, anchor = _add_norm_reason(m, graph)
    if reason:
        record_near_miss(ctx, rule, node, where, reason, seen)
        return False
    add, total = m.node("sum"), m["sum"]
    inputs = [m["x"], m["residual"], m.get("w")] + ([m.get("b")] if node.op == "layer_norm" else [])
    while inputs and inputs[-1] is None:
        inputs.pop()
    meta = {"source": node.source} if node.source else None
    fused = graph.create("add_norm", inputs, _norm_attrs(m), before=anchor, meta=meta)
    normed, new_sum = fused.outputs
    if normed.type != node.output.type or new_sum.type != total.type:
        raise RuntimeError(f"rule {rule.id}: add_norm gives {normed.type}, {new_sum.type} for "
                           f"{node.output.type}, {total.type}")
    ctx.rewrite(rule.id, [add, node], [fused])
    graph.replace_all_uses(node.output, normed)
    graph.replace_all_uses(total, new_sum)
    erase_if_dead(graph, node)
    erase_if_dead(graph, add)
    return True


def _add_norm_reason(m: Match, graph: Graph) -> tuple[str | None, Node | None]:
    """Why ``m`` cannot become add_norm (or None), and the node to insert before."""
    if not m["sum"].dtype.is_float:
        return f"the sum %{m['sum'].name} is {m['sum'].dtype}", None
    pos = _positions(graph)
    add, norm = m.node("sum"), m.node("norm")
    users = [u for u in m["sum"].users if u is not norm] + [norm]
    anchor = min(users, key=lambda u: pos[id(u)])
    for name in ("w", "b"):
        p = m.get(name)
        if p is not None and p.producer is not None and pos[id(p.producer)] >= pos[id(anchor)]:
            return (f"the norm's {name} %{p.name} is computed after the sum's first use "
                    f"({anchor.op} %{anchor.outputs[0].name})"), None
    if pos[id(add)] >= pos[id(anchor)]:
        return "the sum is defined after its first use", None
    return None, anchor


@register_pass
class FuseAddNorm(RewritePass):
    """Residual add + layer_norm / rms_norm -> add_norm (normed, sum), the sum kept for its
    other users."""

    name = "recognize.fuse-add-norm"
    rule_list = [ADD_LAYER_NORM, ADD_RMS_NORM]

    def run(self, graph: Graph, ctx: PassContext) -> None:
        rules = {r.root_ops()[0]: r for r in self.enabled_rules(ctx)}
        seen: set = set()
        for node in graph.nodes:
            rule = rules.get(node.op)
            if rule is not None and not node.is_erased:
                _try_add_norm(rule, node, graph, ctx, seen)


# -- linear epilogue -------------------------------------------------------------------------

_plain_linear = P.op("linear", P.any("x"), P.any("w"), None, name="linear",
                     attrs={"activation": None})


def _check_bias(m: Match) -> str | None:
    w, b, lin = m["w"], m["bias"], m["linear"]
    if b.type.rank != 1 or not dims_equal(b.shape[0], w.shape[0]):
        return f"%{b.name} {b.type} is not a bias of the {w.shape[0]} output features"
    if m.root.outputs[0].type != lin.type:
        return f"adding %{b.name} {b.type} changes the result type {lin.type}"
    return None


LINEAR_BIAS = Rule(
    id="residual/linear-bias",
    pattern=P.op("add", _plain_linear, P.any("bias"), commutative=True),
    check=_check_bias,
    replace=lambda m, b: b.op("linear", m["x"], m["w"], m["bias"]),
)

_ACTIVATIONS = ("gelu", "silu", "relu")


def _activation_name(node: Node) -> str:
    if node.op == "gelu":
        return "gelu" if node.attrs["approximate"] == "none" else "gelu_tanh"
    return node.op


def _check_activation(m: Match) -> str | None:
    if m.root.outputs[0].type != m["linear"].type:
        return f"{m.root.op} changes the linear's type {m['linear'].type}"
    return None


LINEAR_ACTIVATION = Rule(
    id="residual/linear-activation",
    pattern=P.op(_ACTIVATIONS, op_with_optional("linear", [P.any("x"), P.any("w")], ["bias"],
                                                name="linear", attrs={"activation": None})),
    check=_check_activation,
    replace=lambda m, b: b.op("linear", m["x"], m["w"], m.get("bias"),
                              activation=_activation_name(m.root)),
)


@register_pass
class FoldLinearEpilogue(RewritePass):
    """linear + bias add + gelu/silu/relu -> one linear with bias and ``activation``."""

    name = "recognize.fold-linear-epilogue"
    rule_list = [LINEAR_BIAS, LINEAR_ACTIVATION]


__all__ = ["FuseAddNorm", "FoldLinearEpilogue", "ADD_LAYER_NORM", "ADD_RMS_NORM",
           "LINEAR_BIAS", "LINEAR_ACTIVATION"]
