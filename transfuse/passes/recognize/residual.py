"""Residual add + norm -> ``add_norm``; bias add and activation -> ``linear``'s epilogue.

Glossary: E the hidden (normalised) size, N a linear's output features, K its input
features.

``recognize.fuse-add-norm`` — rules ``residual/add-layer-norm``, ``residual/add-rms-norm``:
``norm(x + residual)`` -> ``add_norm(x, residual, weight, bias) {kind, eps, ...}`` with
two outputs ``(normed, sum)``. In a pre-norm Transformer the sum is also the next
residual, so the rules replace the sum as well as the norm (``also_replaces``): the add
may (and usually does) have users outside the match, and they are moved to output 1. The
engine puts the fused node before the first user of the sum and refuses (a near miss)
when the norm's parameters are computed after that point.

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

from transfuse.ir.graph import Node, Value
from transfuse.ir.types import dims_equal
from transfuse.passes.recognize._common import op_with_optional
from transfuse.passes.registry import register_pass
from transfuse.passes.rewrite import Builder, Match, P, RewritePass, Rule

# -- add_norm -------------------------------------------------------------------------------

_sum = P.op("add", P.any("x"), P.any("residual"), name="sum")


def _check_add_norm(m: Match) -> str | None:
    if not m["sum"].dtype.is_float:
        return f"the sum %{m['sum'].name} is {m['sum'].dtype}"
    return None


def _add_norm(m: Match, b: Builder) -> list[Value]:
    """``add_norm`` with the norm's attrs; its outputs replace the norm's and the sum."""
    norm = m.node("norm")
    kind = "layer" if norm.op == "layer_norm" else "rms"
    inputs = [m["x"], m["residual"], m.get("w")] + ([m.get("b")] if kind == "layer" else [])
    while inputs and inputs[-1] is None:
        inputs.pop()
    return b.create("add_norm", inputs, {"kind": kind, **norm.attrs}).outputs


ADD_LAYER_NORM = Rule(
    id="residual/add-layer-norm",
    pattern=op_with_optional("layer_norm", [_sum], ["w", "b"], name="norm"),
    check=_check_add_norm,
    replace=_add_norm,
    also_replaces=("sum",),  # the sum is usually the next residual too
)
ADD_RMS_NORM = Rule(
    id="residual/add-rms-norm",
    pattern=op_with_optional("rms_norm", [_sum], ["w"], name="norm"),
    check=_check_add_norm,
    replace=_add_norm,
    also_replaces=("sum",),
)


@register_pass
class FuseAddNorm(RewritePass):
    """Residual add + layer_norm / rms_norm -> add_norm (normed, sum), the sum kept for its
    other users."""

    name = "recognize.fuse-add-norm"
    rule_list = [ADD_LAYER_NORM, ADD_RMS_NORM]
    max_rounds = 1  # add_norm makes nothing these rules match


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
