"""aten matrix products: linear, mm/bmm/matmul, addmm/baddbmm, einsum, outer."""

from __future__ import annotations

import logging

from transfuse.errors import CaptureError, UnsupportedOpError
from transfuse.frontend.aten.helpers import args_list, operand
from transfuse.frontend.aten.registry import FALLBACK, aten
from transfuse.frontend.build import cast, to_shape
from transfuse.frontend.einsum import emit_einsum, parse_einsum

logger = logging.getLogger(__name__)


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


@aten("addmm", "baddbmm")
def _addmm(cx, a):
    """beta * self + alpha * (mat1 @ mat2), as matmul and add (Hugging Face Conv1D; baddbmm
    with batch1/batch2: BLOOM's ALiBi scores)."""
    x, y = ("batch1", "batch2") if "batch1" in a else ("mat1", "mat2")
    out = cx.op("matmul", cx.value(a[x]), cx.value(a[y]))
    if a["alpha"] != 1:
        out = cx.op("mul", out, operand(cx, a["alpha"], out.dtype))
    if a["beta"] == 0:  # torch ignores self then (even inf/nan in it)
        return out
    bias = cx.value(a["self"])
    if a["beta"] != 1:
        bias = cx.op("mul", bias, operand(cx, a["beta"], bias.dtype))
    return cx.op("add", out, bias)


@aten("einsum")
def _einsum(cx, a):
    """einsum -> reduce_sum / mul / linear / matmul / permute (see ``frontend/einsum.py``);
    an equation it cannot express stays a torch fallback, with the reason logged."""
    operands = [cx.value(t) for t in a["tensors"]]
    want = cx.out_type().dtype
    if any(v.dtype != want for v in operands):
        return cx.fallback_because(f"operand dtypes {[str(v.dtype) for v in operands]}")
    try:
        plan = parse_einsum(a["equation"], operands)
    except (CaptureError, UnsupportedOpError) as e:
        return cx.fallback_because(str(e))
    return emit_einsum(cx, plan, operands)


@aten("outer", "ger")
def _outer(cx, a):
    """outer(a, b) = a[:, None] * b[None, :] (in the promoted dtype)."""
    want = cx.out_type().dtype
    x, y = (cast(cx, cx.value(a[n]), want) for n in ("self", "vec2"))
    return cx.op("mul", to_shape(cx, x, [x.shape[0], 1]), to_shape(cx, y, [1, y.shape[0]]))
