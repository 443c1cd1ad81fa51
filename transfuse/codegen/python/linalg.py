"""Python emitters of ``matmul`` and ``linear`` (``transfuse/ir/opdefs/linalg.py``).

A linear whose ``gemm`` attribute is ``"blas"`` (``layout.select-gemm``), or whose output
is wide, goes through ``_gemm_linear`` (:func:`transfuse.codegen.python.blas.gemm_linear`).
"""

from __future__ import annotations

from transfuse.codegen.python.registry import LOWERINGS, arg


@LOWERINGS.register("matmul")
def _matmul(ctx, node):
    return f"torch.matmul({arg(ctx, node, 0)}, {arg(ctx, node, 1)})"


@LOWERINGS.register("linear")
def _linear(ctx, node):
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    tail = f", {ctx.name(bias)}" if bias is not None else ""
    w = node.inputs[1].type.shape
    if node.attrs.get("gemm") == "blas":
        gemm = ctx.helper("_gemm_linear")
        expr = f"{gemm}({arg(ctx, node, 0)}, {arg(ctx, node, 1)}{tail or ', None'}, True)"
    elif isinstance(w[0], int) and w[0] >= WIDE_LINEAR_COLUMNS:
        # LM-head-like: the result may be big enough to want huge pages (blas.py)
        expr = f"{ctx.helper('_gemm_linear')}({arg(ctx, node, 0)}, {arg(ctx, node, 1)}{tail})"
    else:
        expr = f"F.linear({arg(ctx, node, 0)}, {arg(ctx, node, 1)}{tail})"
    return _LINEAR_ACTIVATIONS[node.attrs.get("activation")].format(expr)


#: a linear with at least this many output columns goes through ``_gemm_linear``, whose large
#: results are mapped with huge pages (one call per layer of Python is all it costs)
WIDE_LINEAR_COLUMNS = 8192

#: linear's ``activation`` attribute -> the call around F.linear
_LINEAR_ACTIVATIONS = {
    None: "{}",
    "gelu": "F.gelu({})",
    "gelu_tanh": "F.gelu({}, approximate='tanh')",
    "silu": "F.silu({})",
    "relu": "torch.relu({})",
}
