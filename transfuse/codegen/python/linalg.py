"""Python emitters of ``matmul`` and ``linear`` (``transfuse/ir/opdefs/linalg.py``).

A linear whose ``gemm`` attribute is ``"blas"`` (``layout.select-gemm``), or whose output
is wide, goes through ``_gemm_linear`` (:func:`transfuse.codegen.python.blas.gemm_linear`).
A linear with at most ``NATIVE_MAX_ROWS`` rows, or a row count known only at run time (the
tokens of a generation step), goes through ``_small_linear``
(:func:`transfuse.codegen.python.small_linear.small_linear`): the native small-M kernel
when the rows are few at run time, else the same GEMM as above.
"""

from __future__ import annotations

import math

from transfuse.codegen.python.registry import LOWERINGS, arg
from transfuse.codegen.python.small_linear import NATIVE_MAX_ROWS


@LOWERINGS.register("matmul")
def _matmul(ctx, node):
    return f"torch.matmul({arg(ctx, node, 0)}, {arg(ctx, node, 1)})"


@LOWERINGS.register("linear")
def _linear(ctx, node):
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    tail = f", {ctx.name(bias)}" if bias is not None else ""
    w = node.inputs[1].type.shape
    rows = node.inputs[0].type.shape[:-1]
    if node.attrs.get("gemm") == "blas":  # a K-major weight: not for the native kernel
        gemm = ctx.helper("_gemm_linear")
        expr = f"{gemm}({arg(ctx, node, 0)}, {arg(ctx, node, 1)}{tail or ', None'}, True)"
    elif any(not isinstance(d, int) for d in rows) or math.prod(rows) <= NATIVE_MAX_ROWS:
        # few rows, or a count known only at run time (generation steps): the native
        # small-M kernel when the rows are few then, else the GEMM chosen below
        wide = isinstance(w[0], int) and w[0] >= WIDE_LINEAR_COLUMNS
        expr = (f"{ctx.helper('_small_linear')}({arg(ctx, node, 0)}, {arg(ctx, node, 1)}"
                f"{tail or ', None'}, {ctx.lit('wide' if wide else 'torch')})")
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
