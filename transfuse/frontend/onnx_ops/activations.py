"""ONNX and ORT activations: Gelu (both domains), FastGelu, BiasGelu, QuickGelu, Clip."""

from __future__ import annotations

from transfuse.frontend.onnx_ops.known import known
from transfuse.frontend.onnx_ops.registry import MS, onnx_op


@onnx_op("Gelu")
def _gelu(cx, node):
    approx = node.attr("approximate", "none")
    if approx not in ("none", "tanh"):
        raise cx.fail(f"approximate must be 'none' or 'tanh', got {approx!r}")
    return [cx.op("gelu", cx.value(node.input(0)), approximate=approx)]


@onnx_op("Gelu", domain=MS)
def _ms_gelu(cx, node):
    return [cx.op("gelu", cx.value(node.input(0)))]


@onnx_op("FastGelu", domain=MS)
def _fast_gelu(cx, node):
    x = cx.value(node.input(0))
    if node.has_input(1):
        x = cx.op("add", x, cx.value(node.input(1)))
    return [cx.op("gelu", x, approximate="tanh")]


@onnx_op("BiasGelu", domain=MS)
def _bias_gelu(cx, node):
    return [cx.op("gelu", cx.op("add", cx.value(node.input(0)), cx.value(node.input(1))))]


@onnx_op("QuickGelu", domain=MS)
def _quick_gelu(cx, node):
    x = cx.value(node.input(0))
    alpha = float(node.attr("alpha", 1.702))
    return [cx.op("mul", x, cx.op("sigmoid", cx.op("mul", x, cx.const(alpha, x.dtype))))]


@onnx_op("Clip")
def _clip(cx, node):
    v = cx.value(node.input(0))
    lo = known(cx, node.input(1)) if node.has_input(1) else None
    hi = known(cx, node.input(2)) if node.has_input(2) else None
    scalars = [k.elements()[0] if k is not None and k.is_concrete and k.data.size == 1 else None
               for k in (lo, hi)]
    given = [node.has_input(1), node.has_input(2)]
    if v.dtype.is_float and all(s is not None or not g for s, g in zip(scalars, given)):
        if not any(given):
            return [v]
        return [cx.op("clamp", v, min=scalars[0], max=scalars[1])]
    if given[0]:
        v = cx.op("maximum", v, cx.value(node.input(1)))
    if given[1]:
        v = cx.op("minimum", v, cx.value(node.input(2)))
    return [v]
