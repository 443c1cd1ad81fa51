"""Python emitters of ``layer_norm`` and ``rms_norm`` (``transfuse/ir/opdefs/nn.py``).

fp32 RMSNorm over one dim goes to ``_rms_norm`` (``codegen/native/ops.py``: one pass per row
in C when available, else ``F.rms_norm``).
"""

from __future__ import annotations

from transfuse.codegen.python.registry import LOWERINGS, EmitContext, arg, norm_shape
from transfuse.ir.graph import Node, Value
from transfuse.ir.types import DType


@LOWERINGS.register("layer_norm")
def _layer_norm(ctx, node):
    a = node.attrs
    return (f"F.layer_norm({arg(ctx, node)}, {norm_shape(ctx, node)}, {arg(ctx, node, 1)}, "
            f"{arg(ctx, node, 2)}, {ctx.lit(a['eps'])})")


@LOWERINGS.register("rms_norm")
def _rms_norm(ctx, node):
    """Reference: normalise (in fp32 when ``upcast``), cast back, then times (offset + weight)."""
    w = node.inputs[1] if len(node.inputs) > 1 else None
    return rms_norm_expr(ctx, node, ctx.name(node.inputs[0]), node.inputs[0].type.dtype, w)


def rms_norm_expr(ctx: EmitContext, node: Node, xs: str, x_dtype: DType, w: Value | None) -> str:
    """rms_norm of the expression ``xs`` (of ``x_dtype``) with ``node``'s attributes."""
    a = node.attrs
    shape, eps = norm_shape(ctx, node, xs), ctx.lit(a["eps"])
    upcast = a["upcast"] and x_dtype not in (DType.f32, DType.f64)
    weight = None
    if w is not None:
        weight = ctx.name(w) if not a["offset"] else f"({ctx.name(w)} + {ctx.lit(a['offset'])})"
    if (x_dtype == DType.f32 and a["normalized_ndim"] == 1 and not a["offset"]
            and (w is None or w.type.dtype == DType.f32)):
        # one pass per row in C when available (native/ops.py), else F.rms_norm
        return f"{ctx.helper('_rms_norm')}({xs}, {weight}, {eps})"
    if not upcast and weight is not None and w.type.dtype == x_dtype:
        return f"F.rms_norm({xs}, {shape}, {weight}, {eps})"
    core = (f"F.rms_norm({xs}.float(), {shape}, None, {eps}).to({xs}.dtype)" if upcast
            else f"F.rms_norm({xs}, {shape}, None, {eps})")
    return core if weight is None else f"{core} * {weight}"
