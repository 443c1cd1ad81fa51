"""ONNX lowerings of the elementwise ops (``transfuse/ir/opdefs/elementwise.py``).

GELU and SiLU use ORT's ``Gelu``/``FastGelu``/``BiasGelu``/``QuickGelu`` where they compute
exactly the IR op (:func:`activation`, shared with ``linear``'s fused activation): a tanh
GELU never becomes BiasGelu, whose GELU is the erf one.
"""

from __future__ import annotations

import math

from transfuse.codegen.onnx.registry import (
    LOWERINGS,
    common_dtype,
    fusable,
    inputs_as,
    out_dtype,
)
from transfuse.ir.graph import Node
from transfuse.ir.types import DType

_BINARY = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "pow": "Pow",
           "maximum": "Max", "minimum": "Min"}
_COMPARE = {"eq": "Equal", "lt": "Less", "le": "LessOrEqual", "gt": "Greater",
            "ge": "GreaterOrEqual"}
_LOGICAL = {"logical_and": "And", "logical_or": "Or", "logical_xor": "Xor"}
_UNARY_FLOAT = {"exp": "Exp", "log": "Log", "sqrt": "Sqrt", "reciprocal": "Reciprocal",
                "tanh": "Tanh", "erf": "Erf", "sigmoid": "Sigmoid", "sin": "Sin", "cos": "Cos"}
_UNARY_SAME = {"neg": "Neg", "abs": "Abs", "relu": "Relu", "sign": "Sign"}


def _binary(op_type: str):
    def lower(b, node):
        return b.add(op_type, inputs_as(b, node, out_dtype(node)))

    return lower


def _compare(op_type: str):
    def lower(b, node):
        return b.add(op_type, inputs_as(b, node, common_dtype(node)))

    return lower


def _logical(op_type: str):
    def lower(b, node):
        return b.add(op_type, inputs_as(b, node, DType.bool))

    return lower


def _unary(op_type: str):
    def lower(b, node):
        return b.add(op_type, [b.input(node, 0, out_dtype(node))])

    return lower


for _op, _t in _BINARY.items():
    LOWERINGS.register(_op)(_binary(_t))
for _op, _t in _COMPARE.items():
    LOWERINGS.register(_op)(_compare(_t))
for _op, _t in _LOGICAL.items():
    LOWERINGS.register(_op)(_logical(_t))
for _op, _t in {**_UNARY_FLOAT, **_UNARY_SAME}.items():
    LOWERINGS.register(_op)(_unary(_t))


@LOWERINGS.register("ne")
def _ne(b, node):
    return b.add("Not", [b.add("Equal", inputs_as(b, node, common_dtype(node)))])


@LOWERINGS.register("logical_not")
def _logical_not(b, node):
    return b.add("Not", [b.input(node, 0, DType.bool)])


@LOWERINGS.register("rsqrt")
def _rsqrt(b, node):
    return b.add("Reciprocal", [b.add("Sqrt", [b.input(node, 0, out_dtype(node))])])


@LOWERINGS.register("floor", "ceil")
def _round(b, node):
    x = b.input(node, 0)
    if not out_dtype(node).is_float:
        return x  # integers are already whole
    return b.add("Floor" if node.op == "floor" else "Ceil", [x])


@LOWERINGS.register("floor_div")
def _floor_div(b, node):
    """Floor division: exact ``(a - a mod b) / b`` for integers, ``floor(a / b)`` for floats."""
    dtype = out_dtype(node)
    a, c = inputs_as(b, node, dtype)
    if dtype.is_float:
        return b.add("Floor", [b.add("Div", [a, c])])
    rem = b.add("Mod", [a, c], fmod=0)
    return b.add("Div", [b.add("Sub", [a, rem]), c])


@LOWERINGS.register("remainder")
def _remainder(b, node):
    """Python's remainder (sign of the divisor): Mod for integers, a - b*floor(a/b) for floats."""
    dtype = out_dtype(node)
    a, c = inputs_as(b, node, dtype)
    if not dtype.is_float:
        return b.add("Mod", [a, c], fmod=0)
    q = b.add("Floor", [b.add("Div", [a, c])])
    return b.add("Sub", [a, b.add("Mul", [c, q])])


@LOWERINGS.register("silu")
def _silu(b, node):
    x = b.input(node, 0, out_dtype(node))
    if b.fused:
        return b.ms("QuickGelu", [x], alpha=1.0)  # x * sigmoid(1.0 * x)
    return b.add("Mul", [x, b.add("Sigmoid", [x])])


@LOWERINGS.register("cast")
def _cast(b, node):
    return b.input(node, 0, node.attrs["dtype"])


@LOWERINGS.register("where")
def _where(b, node):
    dtype = out_dtype(node)
    return b.add("Where", [b.input(node, 0, DType.bool), b.input(node, 1, dtype),
                           b.input(node, 2, dtype)])


@LOWERINGS.register("clamp")
def _clamp(b, node):
    dtype = out_dtype(node)
    lo, hi = node.attrs["min"], node.attrs["max"]
    if not dtype.is_float:  # integer stays integer: bounds rounded inward
        lo = math.ceil(lo) if lo is not None and math.isfinite(lo) else None
        hi = math.floor(hi) if hi is not None and math.isfinite(hi) else None
    ins = [b.input(node, 0),
           b.const(lo, dtype, "min") if lo is not None else "",
           b.const(hi, dtype, "max") if hi is not None else ""]
    while ins[-1] == "":
        ins.pop()
    return b.add("Clip", ins) if len(ins) > 1 else ins[0]




def gelu_std(b, x: str, approximate: str, dtype: DType) -> str:
    """GELU with standard ops, in the reference's order of operations."""
    half = b.const(0.5, dtype, "half")
    one = b.const(1.0, dtype, "one")
    if approximate == "tanh":
        cube = b.add("Mul", [b.add("Mul", [x, x]), x])
        inner = b.add("Add", [x, b.add("Mul", [cube, b.const(0.044715, dtype, "k")])])
        t = b.add("Tanh", [b.add("Mul", [inner, b.const(math.sqrt(2 / math.pi), dtype, "k")])])
        return b.add("Mul", [b.add("Mul", [x, half]), b.add("Add", [t, one])])
    e = b.add("Erf", [b.add("Mul", [x, b.const(1 / math.sqrt(2), dtype, "k")])])
    return b.add("Mul", [b.add("Mul", [x, half]), b.add("Add", [e, one])])


def activation(b, node: Node, x: str, bias: str, act: str | None, dtype: DType) -> str:
    """``act(x + bias)`` (bias may be ""), with fused ops where allowed."""
    fused = fusable(b, node)
    if fused and act == "gelu_tanh":
        return b.ms("FastGelu", [x, bias] if bias else [x])
    if fused and act == "gelu":
        return b.ms("BiasGelu", [x, bias]) if bias else b.ms("Gelu", [x])
    if bias:
        x = b.add("Add", [x, bias])
    if act is None:
        return x
    if act == "relu":
        return b.add("Relu", [x])
    if act == "silu":
        return b.ms("QuickGelu", [x], alpha=1.0) if fused else \
            b.add("Mul", [x, b.add("Sigmoid", [x])])
    return gelu_std(b, x, "tanh" if act == "gelu_tanh" else "none", dtype)



@LOWERINGS.register("gelu")
def _gelu(b, node):
    dtype = out_dtype(node)
    x = b.input(node, 0, dtype)
    act = "gelu_tanh" if node.attrs["approximate"] == "tanh" else "gelu"
    return activation(b, node, x, "", act, dtype)
