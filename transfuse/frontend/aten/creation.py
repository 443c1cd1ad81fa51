"""aten tensor creation: full/zeros/ones/empty, scalar_tensor, fill, arange, tril/triu."""

from __future__ import annotations

from typing import Any

import sympy

from transfuse.frontend.aten.helpers import full_result, is_tensor_arg
from transfuse.frontend.aten.registry import FALLBACK, Converter, aten


@aten("full", "full_like", "new_full")
def _full_op(cx, a):
    v = a["fill_value"]
    return full_result(cx, cx.value(v) if is_tensor_arg(cx, v) else cx.scalar(v))


@aten(
    "zeros",
    "zeros_like",
    "new_zeros",
    "empty",
    "empty_like",
    "new_empty",
    "empty_strided",
    "new_empty_strided",
    "zero",
)
def _zeros(cx, a):
    return full_result(cx, 0)


@aten("ones", "ones_like", "new_ones")
def _ones(cx, a):
    return full_result(cx, 1)


@aten("scalar_tensor")
def _scalar_tensor(cx, a):
    return full_result(cx, cx.scalar(a["s"]))


@aten("fill.Scalar")
def _fill(cx, a):
    return full_result(cx, cx.scalar(a["value"]))


def _int_or_none(v: Any) -> Any:
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


@aten("arange.default", "arange.start", "arange.start_step")
def _arange(cx, a):
    start = _int_or_none(cx.scalar(a.get("start", 0)))
    end = _int_or_none(cx.scalar(a["end"]))
    step = _int_or_none(cx.scalar(a.get("step", 1)))
    if (
        not all(isinstance(v, (int, sympy.Basic)) and not isinstance(v, bool) for v in (start, end))
        or not isinstance(step, int)
        or step == 0
    ):
        return FALLBACK
    return cx.op("arange", start=start, end=end, step=step, dtype=cx.out_type().dtype)


def _triangle(ir_op: str) -> Converter:
    return lambda cx, a: cx.op(ir_op, cx.value(a["self"]), diagonal=a["diagonal"])


aten("tril")(_triangle("tril"))
aten("triu")(_triangle("triu"))
