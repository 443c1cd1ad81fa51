"""Python emitters of the elementwise ops (``transfuse/ir/opdefs/elementwise.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from transfuse.codegen.python.registry import LOWERINGS, EmitContext, arg
from transfuse.ir.graph import Node

_INFIX = {"add": "+", "sub": "-", "mul": "*", "div": "/", "pow": "**", "remainder": "%",
          "eq": "==", "ne": "!=", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}
_CALL2 = {"maximum": "torch.maximum", "minimum": "torch.minimum",
          "logical_and": "torch.logical_and", "logical_or": "torch.logical_or",
          "logical_xor": "torch.logical_xor"}
_CALL1 = {"exp": "torch.exp", "log": "torch.log", "sqrt": "torch.sqrt", "rsqrt": "torch.rsqrt",
          "reciprocal": "torch.reciprocal", "tanh": "torch.tanh", "erf": "torch.erf",
          "sigmoid": "torch.sigmoid", "sin": "torch.sin", "cos": "torch.cos",
          "abs": "torch.abs", "relu": "torch.relu", "floor": "torch.floor", "ceil": "torch.ceil",
          "sign": "torch.sign", "logical_not": "torch.logical_not"}


def _infix(symbol: str) -> Callable[[EmitContext, Node], str]:
    return lambda ctx, node: f"{arg(ctx, node, 0)} {symbol} {arg(ctx, node, 1)}"


def _call(fn: str, arity: int) -> Callable[[EmitContext, Node], str]:
    return lambda ctx, node: f"{fn}({', '.join(arg(ctx, node, i) for i in range(arity))})"


for _op, _sym in _INFIX.items():
    LOWERINGS.register(_op)(_infix(_sym))
for _op, _fn in _CALL2.items():
    LOWERINGS.register(_op)(_call(_fn, 2))
for _op, _fn in _CALL1.items():
    LOWERINGS.register(_op)(_call(_fn, 1))


@LOWERINGS.register("floor_div")
def _floor_div(ctx, node):
    return f"torch.div({arg(ctx, node, 0)}, {arg(ctx, node, 1)}, rounding_mode='floor')"


@LOWERINGS.register("silu")
def _silu(ctx, node):
    x = arg(ctx, node)
    return f"F.silu({x})" if node.inputs[0].type.dtype.is_float else f"F.silu({x}.float())"


@LOWERINGS.register("neg")
def _neg(ctx, node):
    return f"-{arg(ctx, node)}"


@LOWERINGS.register("gelu")
def _gelu(ctx, node):
    approx = node.attrs["approximate"]
    extra = "" if approx == "none" else f", approximate={ctx.lit(approx)}"
    return f"F.gelu({arg(ctx, node)}{extra})"


@LOWERINGS.register("cast")
def _cast(ctx, node):
    return f"{arg(ctx, node)}.to({ctx.lit(node.attrs['dtype'])})"


@LOWERINGS.register("where")
def _where(ctx, node):
    return f"torch.where({arg(ctx, node, 0)}, {arg(ctx, node, 1)}, {arg(ctx, node, 2)})"


@LOWERINGS.register("clamp")
def _clamp(ctx, node):
    lo, hi = node.attrs["min"], node.attrs["max"]
    if not node.inputs[0].type.dtype.is_float:  # integer stays integer: bounds rounded inward
        lo = math.ceil(lo) if lo is not None and math.isfinite(lo) else lo
        hi = math.floor(hi) if hi is not None and math.isfinite(hi) else hi
    return f"torch.clamp({arg(ctx, node)}, {ctx.lit(lo)}, {ctx.lit(hi)})"
