"""ONNX matrix products: MatMul/Gemm (a constant 2-D weight -> ``linear``), Einsum."""

from __future__ import annotations

from transfuse.errors import CaptureError, UnsupportedOpError
from transfuse.frontend.build import to_shape
from transfuse.frontend.einsum import emit_einsum, parse_einsum
from transfuse.frontend.onnx_ops.helpers import weight_t
from transfuse.frontend.onnx_ops.registry import onnx_op
from transfuse.ir.types import dims_equal


@onnx_op("MatMul")
def _matmul(cx, node):
    a, b = cx.value(node.input(0)), cx.value(node.input(1))
    if b.type.rank == 2 and a.type.rank >= 1 and a.dtype == b.dtype:
        p = b.producer
        if b.is_const:
            return [cx.op("linear", a, weight_t(cx, b), None)]
        if p is not None and p.op == "permute" and p.inputs[0].is_const:  # x @ W.T
            return [cx.op("linear", a, p.inputs[0], None)]
    return [cx.op("matmul", a, b)]


@onnx_op("Gemm")
def _gemm(cx, node):
    a, b = cx.value(node.input(0)), cx.value(node.input(1))
    if a.type.rank != 2 or b.type.rank != 2:
        raise cx.fail(f"Gemm takes 2-D A and B, got {a.type} and {b.type}")
    alpha, beta = float(node.attr("alpha", 1.0)), float(node.attr("beta", 1.0))
    if node.attr("transA", 0):
        a = cx.op("permute", a, perm=[1, 0])
    c = cx.value(node.input(2)) if node.has_input(2) else None
    n = b.shape[0] if node.attr("transB", 0) else b.shape[1]
    bias = None
    if c is not None and beta == 1.0 and alpha == 1.0 and c.type.rank <= 2 and \
            c.type.rank >= 1 and dims_equal(c.shape[-1], n) and (c.type.rank == 1 or
                                                                 c.shape[0] == 1):
        bias, c = to_shape(cx, c, [n]), None
    if b.is_const:
        w = b if node.attr("transB", 0) else weight_t(cx, b)
        y = cx.op("linear", a, w, bias)
    else:
        bt = cx.op("permute", b, perm=[1, 0]) if node.attr("transB", 0) else b
        y = cx.op("matmul", a, bt)
        if bias is not None:
            y = cx.op("add", y, bias)
    if alpha != 1.0:
        y = cx.op("mul", y, cx.const(alpha, y.dtype))
    if c is not None and beta != 0.0:
        if beta != 1.0:
            c = cx.op("mul", c, cx.const(beta, c.dtype))
        y = cx.op("add", y, c)
    return [y]


@onnx_op("Einsum")
def _einsum(cx, node):
    """Einsum of any number of operands, contracted pairwise into reduce_sum / mul / linear /
    matmul / permute (``frontend/einsum.py``, shared with the torch frontend). Repeated
    letters in one operand (diagonals) and broadcasting between operands are unsupported."""
    eq = str(node.attr("equation", ""))
    vals = [cx.value(node.input(i)) for i in range(len(node.inputs)) if node.has_input(i)]
    try:
        plan = parse_einsum(eq, vals)
    except UnsupportedOpError as e:
        raise cx.unsupported(str(e)) from None
    except CaptureError as e:
        raise cx.fail(str(e)) from None
    return [emit_einsum(cx, plan, vals)]
