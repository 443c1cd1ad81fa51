"""aten elementwise ops: unary and binary arithmetic, comparisons, logic on bools,
div/rsub, gelu, clamp, where and masked_fill."""

from __future__ import annotations

from typing import Any

import sympy

from transfuse.frontend.aten.helpers import args_list, is_tensor_arg, operand, operands
from transfuse.frontend.aten.registry import FALLBACK, Converter, aten
from transfuse.frontend.build import cast, sym_value
from transfuse.ir.graph import Value
from transfuse.ir.types import DType, result_dtype

#: elementwise ops whose IR op has the aten name; binary ones take tensor or python-scalar
#: operands (and ``alpha`` for add/sub)
UNARY = (
    "neg exp log sqrt rsqrt reciprocal tanh erf sigmoid relu abs sin cos silu floor ceil sign "
    "logical_not"
).split()
BINARY = {
    n: n
    for n in (
        "add sub mul maximum minimum remainder pow eq ne lt le gt ge logical_and logical_or "
        "logical_xor"
    ).split()
}
BINARY["floor_divide"] = "floor_div"
#: the binary overloads of min/max (the reductions are in reduce.py; T5's position buckets)
BINARY.update({"min.other": "minimum", "max.other": "maximum"})
#: bit operations are logical ones on bool tensors (integer ones fall back)
BITWISE_ON_BOOL = {
    f"{prefix}{op}{suffix}": f"logical_{op}"
    for op in ("and", "or", "xor")
    for prefix, suffix in (("bitwise_", ""), ("__", "__"))
}


def _unary(ir_op: str) -> Converter:
    return lambda cx, a: cx.op(ir_op, cx.value(args_list(a)[0]))


def _binary(ir_op: str) -> Converter:
    def convert(cx, a):
        x, y = args_list(a)[:2]
        vx, vy = operands(cx, x, y)
        alpha = a.get("alpha", 1)
        if ir_op in ("add", "sub") and alpha != 1:
            vy = cx.op("mul", vy, operand(cx, alpha, vy.dtype))
        return cx.op(ir_op, vx, vy)

    return convert


def _bitwise(ir_op: str) -> Converter:
    def convert(cx, a):
        if cx.out_type().dtype != DType.bool:
            return FALLBACK  # integer bit operations have no IR op
        x, y = args_list(a)[:2]
        return cx.op(ir_op, *operands(cx, x, y))

    return convert


for _name in UNARY:
    aten(_name)(_unary(_name))
for _name, _op in BINARY.items():
    aten(_name)(_binary(_op))
for _name, _op in BITWISE_ON_BOOL.items():
    aten(_name)(_bitwise(_op))


@aten("bitwise_not")
def _bitwise_not(cx, a):
    if cx.out_type().dtype != DType.bool:
        return FALLBACK
    return cx.op("logical_not", cx.value(a["self"]))


@aten("div")
def _div(cx, a):
    x, y = args_list(a)[:2]
    mode = a.get("rounding_mode")
    vx, vy = operands(cx, x, y)
    if mode == "floor":
        return cx.op("floor_div", vx, vy)
    if mode is not None:
        return FALLBACK  # "trunc" has no IR op
    want = cx.out_type().dtype
    if result_dtype(vx.type, vy.type) != want:  # true division of integers is float
        vx, vy = cast(cx, vx, want), cast(cx, vy, want)
    return cx.op("div", vx, vy)


@aten("rsub")
def _rsub(cx, a):
    vx, vy = operands(cx, a["self"], a["other"])
    if a["alpha"] != 1:
        vx = cx.op("mul", vx, operand(cx, a["alpha"], vx.dtype))
    return cx.op("sub", vy, vx)


@aten("gelu")
def _gelu(cx, a):
    return cx.op("gelu", cx.value(a["self"]), approximate=a["approximate"])


def _clamp_scalars(cx, x: Value, lo: Any, hi: Any) -> Value:
    if (
        x.dtype.is_float
        and all(v is None or isinstance(v, (int, float)) for v in (lo, hi))
        and not any(isinstance(v, bool) for v in (lo, hi))
    ):
        return cx.op("clamp", x, min=lo, max=hi)
    if lo is not None:
        x = cx.op("maximum", x, operand(cx, lo, x.dtype))
    if hi is not None:
        x = cx.op("minimum", x, operand(cx, hi, x.dtype))
    return x


@aten("clamp.default", "clip.default")
def _clamp(cx, a):
    x = cast(cx, cx.value(a["self"]), cx.out_type().dtype)
    return _clamp_scalars(cx, x, cx.scalar(a["min"]), cx.scalar(a["max"]))


@aten("clamp.Tensor", "clip.Tensor")
def _clamp_tensor(cx, a):
    x = cx.value(a["self"])
    if a["min"] is not None:
        x = cx.op("maximum", x, cx.value(a["min"]))
    if a["max"] is not None:
        x = cx.op("minimum", x, cx.value(a["max"]))
    return x


@aten("clamp_min.default")
def _clamp_min(cx, a):
    x = cast(cx, cx.value(a["self"]), cx.out_type().dtype)
    return _clamp_scalars(cx, x, cx.scalar(a["min"]), None)


@aten("clamp_max.default")
def _clamp_max(cx, a):
    x = cast(cx, cx.value(a["self"]), cx.out_type().dtype)
    return _clamp_scalars(cx, x, None, cx.scalar(a["max"]))


@aten("where.self", "where.ScalarSelf", "where.ScalarOther", "where.Scalar")
def _where(cx, a):
    cond = cx.value(a["condition"])
    if cond.dtype != DType.bool:
        cond = cx.op("cast", cond, dtype=DType.bool)
    vx, vy = operands(cx, a["self"], a["other"])
    return cx.op("where", cond, vx, vy)


@aten("masked_fill.Scalar", "masked_fill.Tensor")
def _masked_fill(cx, a):
    x = cx.value(a["self"])
    mask = cx.value(a["mask"])
    if mask.dtype != DType.bool:
        return FALLBACK
    if is_tensor_arg(cx, a["value"]):
        fill = cast(cx, cx.value(a["value"]), x.dtype)
    else:
        value = cx.scalar(a["value"])
        fill = (
            sym_value(cx, value, x.dtype)
            if isinstance(value, sympy.Basic)
            else cx.const(value, x.dtype)
        )
    return cx.op("where", mask, fill, x)


@aten("square")
def _square(cx, a):
    """square(x) = x * x (in the result dtype: bool squares to int64, as torch's pow does)."""
    x = cast(cx, cx.value(a["self"]), cx.out_type().dtype)
    return cx.op("mul", x, x)
