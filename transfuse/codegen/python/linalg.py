"""Python emitters of ``matmul`` and ``linear`` (``transfuse/ir/opdefs/linalg.py``).

A linear whose ``gemm`` attribute is ``"blas"`` (``layout.select-gemm``), or whose output
is wide, goes through ``_gemm_linear`` (:func:`transfuse.codegen.python.blas.gemm_linear`).
A linear with at most ``NATIVE_MAX_ROWS`` rows, or a row count known only at run time (the
tokens of a generation step), goes through ``_small_linear``
(:func:`transfuse.codegen.python.small_linear.small_linear`): the native small-M kernel
when the rows are few at run time, else the same GEMM as above. A ``matmul`` by a constant
2-D weight [K, N] (GPT-2's Conv1D) with such rows goes through ``_small_matmul``, the same
kernel reading the weight K-major.
"""

from __future__ import annotations

import math

from transfuse.codegen.python.registry import LOWERINGS, arg
from transfuse.codegen.python.small_linear import NATIVE_MAX_ROWS


@LOWERINGS.register("matmul")
def _matmul(ctx, node):
    w = node.inputs[1]
    if w.is_const and w.type.rank == 2 and node.inputs[0].type.rank >= 1 and _few_rows(node):
        # x times a [K, N] weight (GPT-2's Conv1D) with few or run-time rows: the native kernel
        return f"{ctx.helper('_small_matmul')}({arg(ctx, node, 0)}, {arg(ctx, node, 1)})"
    return f"torch.matmul({arg(ctx, node, 0)}, {arg(ctx, node, 1)})"


def _few_rows(node) -> bool:
    """The rows of ``node``'s first input (all dims but the last) are known only at run time
    (the tokens of a generation step) or are at most ``NATIVE_MAX_ROWS``."""
    rows = node.inputs[0].type.shape[:-1]
    return any(not isinstance(d, int) for d in rows) or math.prod(rows) <= NATIVE_MAX_ROWS


@LOWERINGS.register("linear")
def _linear(ctx, node):
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    tail = f", {ctx.name(bias)}" if bias is not None else ""
    w = node.inputs[1].type.shape
    if node.attrs.get("gemm") == "blas":  # OpenBLAS on a K-major weight, as selected
        gemm = ctx.helper("_gemm_linear")
        expr = f"{gemm}({arg(ctx, node, 0)}, {arg(ctx, node, 1)}{tail or ', None'}, True)"
    elif _few_rows(node):
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
