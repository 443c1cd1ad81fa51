"""aten matrix products: linear, mm/bmm/matmul, addmm."""

from __future__ import annotations

from transfuse.frontend.aten.helpers import args_list, operand
from transfuse.frontend.aten.registry import FALLBACK, aten


@aten("linear")
def _linear(cx, a):
    if cx.value(a["weight"]).type.rank != 2:
        return FALLBACK  # the IR's linear takes a 2-D [N, K] weight
    bias = cx.value(a["bias"]) if a["bias"] is not None else None
    return cx.op("linear", cx.value(a["input"]), cx.value(a["weight"]), bias)


@aten("mm", "bmm", "matmul")
def _matmul(cx, a):
    x, y = args_list(a)[:2]
    return cx.op("matmul", cx.value(x), cx.value(y))


@aten("addmm")
def _addmm(cx, a):
    """beta * self + alpha * (mat1 @ mat2), as matmul and add (Hugging Face Conv1D)."""
    out = cx.op("matmul", cx.value(a["mat1"]), cx.value(a["mat2"]))
    if a["alpha"] != 1:
        out = cx.op("mul", out, operand(cx, a["alpha"], out.dtype))
    bias = cx.value(a["self"])
    if a["beta"] != 1:
        bias = cx.op("mul", bias, operand(cx, a["beta"], bias.dtype))
    return cx.op("add", out, bias)
