"""IR building blocks both frontends share: casts, reshapes, and symbolic sizes as values.

``cx`` is either frontend's converter; only ``cx.op``, ``cx.const`` and ``cx.graph`` are used.
"""

from __future__ import annotations

from typing import Any

import sympy

from transfuse.errors import CaptureError
from transfuse.ir.graph import Value
from transfuse.ir.types import DType, dims_equal


def cast(cx, v: Value, dtype: DType) -> Value:
    return v if v.dtype == dtype else cx.op("cast", v, dtype=dtype)


def to_shape(cx, v: Value, shape) -> Value:
    """``v`` reshaped to ``shape`` (no node when it already has it)."""
    if v.type.rank == len(shape) and all(dims_equal(a, b) for a, b in zip(v.shape, shape)):
        return v
    return cx.op("reshape", v, shape=list(shape))


def sym_value(cx, e: Any, dtype: DType = DType.i64) -> Value:
    """A symbolic size expression as a 0-d tensor, built from ``shape_of`` of an input."""
    return cast(cx, _sym_i64(cx, sympy.sympify(e)), dtype)


def _sym_i64(cx, e) -> Value:
    if e.is_Integer:
        return cx.const(int(e), DType.i64)
    if e.is_Symbol:
        for inp in cx.graph.inputs:
            for i, d in enumerate(inp.type.shape):
                if not isinstance(d, int) and d == e:
                    return cx.op("shape_of", inp, axis=i)
        raise CaptureError(f"no input carries symbolic dim {e}")
    if isinstance(e, sympy.Add):
        terms = [_sym_i64(cx, t) for t in e.args]
        out = terms[0]
        for t in terms[1:]:
            out = cx.op("add", out, t)
        return out
    if isinstance(e, sympy.Mul) and all(f.is_Integer or not f.is_Number for f in e.args):
        factors = [_sym_i64(cx, f) for f in e.args]
        out = factors[0]
        for f in factors[1:]:
            out = cx.op("mul", out, f)
        return out
    if isinstance(e, sympy.floor):
        num, den = sympy.fraction(sympy.together(e.args[0]))
        if den.is_Integer:
            return cx.op("floor_div", _sym_i64(cx, num), cx.const(int(den), DType.i64))
    if isinstance(e, sympy.Mod):
        return cx.op("remainder", _sym_i64(cx, e.args[0]), _sym_i64(cx, e.args[1]))
    raise CaptureError(f"{cx.op_name()} at {cx.where()}: cannot compute the size expression {e}")
