"""Python emitters of the fused ops made by the recognition passes.

``swiglu``, ``rotary`` and ``add_norm`` (``transfuse/ir/opdefs/fused.py``) written as
direct torch calls in the order of their reference implementations, so the generated
code computes what the interpreter does. Registered on the python backend's
:data:`~transfuse.codegen.python.registry.LOWERINGS`.

Glossary: D head dim (static, even), E normalised size.
"""

from __future__ import annotations

from transfuse.codegen.python.nn import rms_norm_expr
from transfuse.codegen.python.registry import LOWERINGS, arg, norm_shape
from transfuse.ir.types import DType, dims_equal, result_dtype


def _same_f32(a, b) -> bool:
    """Both values fp32 with provably equal shapes (what the native kernels take)."""
    return (a.type.dtype == DType.f32 and b.type.dtype == DType.f32 and a.type.rank == b.type.rank
            and all(dims_equal(p, q) for p, q in zip(a.type.shape, b.type.shape)))


@LOWERINGS.register("swiglu")
def _swiglu(ctx, node):
    """fp32: ``_swiglu`` (native/ops.py: one pass in C, else this same torch expression)."""
    g, u = node.inputs[0], node.inputs[1]
    if _same_f32(g, u):
        return f"{ctx.helper('_swiglu')}({arg(ctx, node, 0)}, {arg(ctx, node, 1)})"
    return f"F.silu({arg(ctx, node, 0)}) * {arg(ctx, node, 1)}"


@LOWERINGS.register("rotary")
def _rotary(ctx, node):
    """fp32: ``_rotary`` (native/ops.py: one pass in C, else this same torch expression)."""
    if all(v.type.dtype == DType.f32 for v in node.inputs[:3]):
        x, cos, sin = (ctx.name(v) for v in node.inputs[:3])
        return f"{ctx.helper('_rotary')}({x}, {cos}, {sin}, {ctx.lit(node.attrs['interleaved'])})"
    x, cos, sin = (arg(ctx, node, i) for i in range(3))
    if node.attrs["interleaved"]:
        rot = f"torch.stack((-{x}[..., 1::2], {x}[..., 0::2]), dim=-1).flatten(-2)"
    else:
        half = node.inputs[0].type.shape[-1] // 2
        rot = f"torch.cat((-{x}[..., {half}:], {x}[..., :{half}]), dim=-1)"
    return f"{x} * {cos} + {rot} * {sin}"


@LOWERINGS.register("add_norm")
def _add_norm(ctx, node):
    """``(norm(s), s)`` with ``s = x + residual``, bound once by a lambda parameter (``_sum``:
    generated value names never start with an underscore, so it shadows nothing)."""
    a = node.attrs
    x, r = node.inputs[0], node.inputs[1]
    w = node.inputs[2] if len(node.inputs) > 2 else None
    if (a["kind"] == "rms" and a["normalized_ndim"] == 1 and not a["offset"] and _same_f32(x, r)
            and (w is None or w.type.dtype == DType.f32)):
        # one pass per row in C when available (native/ops.py), else x + r and F.rms_norm
        weight = "None" if w is None else ctx.name(w)
        fn = ctx.helper("_add_rms_norm")
        return f"{fn}({ctx.name(x)}, {ctx.name(r)}, {weight}, {ctx.lit(a['eps'])})"
    if a["kind"] == "layer":
        normed = (f"F.layer_norm(_sum, {norm_shape(ctx, node, '_sum')}, {arg(ctx, node, 2)}, "
                  f"{arg(ctx, node, 3)}, {ctx.lit(a['eps'])})")
    else:
        normed = rms_norm_expr(ctx, node, "_sum", result_dtype(x.type, r.type), w)
    return f"(lambda _sum: ({normed}, _sum))({ctx.name(x)} + {ctx.name(r)})"
