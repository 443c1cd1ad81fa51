"""ONNX arithmetic and logic: Add/Sub/Mul/Div/Mod/Pow, comparisons, And/Or/Xor,
Max/Min/Sum, unary math, Reciprocal (Sqrt + Reciprocal -> ``rsqrt``). Each also evaluates
Known inputs at capture (shape arithmetic)."""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import reduce

import numpy as np
import sympy

from transfuse.frontend.build import cast
from transfuse.frontend.onnx_ops.known import (
    KNOWN_MAX,
    Known,
    all_known,
    known,
    sym_max,
    sym_min,
    vec_map,
)
from transfuse.frontend.onnx_ops.registry import Converter, onnx_op
from transfuse.ir.types import DType, dims_equal


def _tdiv(a, b):
    """Integer division truncating toward zero (ONNX Div on integers)."""
    if isinstance(a, int) and isinstance(b, int):
        if b == 0:
            raise ZeroDivisionError("integer division by zero in a shape computation")
        q = abs(a) // abs(b)
        return q if (a >= 0) == (b >= 0) else -q
    return sympy.floor(sympy.sympify(a) / b)  # sizes are non-negative


def _imod(a, b):
    if isinstance(a, int) and isinstance(b, int):
        return a % b
    return sympy.Mod(a, b)


def _rel(fn, sym_fn):
    def rel(a, b):
        if isinstance(a, sympy.Basic) or isinstance(b, sympy.Basic):
            r = sym_fn(a, b)
            return bool(r) if isinstance(r, sympy.logic.boolalg.BooleanAtom) else r
        return fn(a, b)

    return rel


ARITH = {
    "Add": ("add", lambda a, b: a + b),
    "Sub": ("sub", lambda a, b: a - b),
    "Mul": ("mul", lambda a, b: a * b),
}
COMPARE = {
    "Equal": ("eq", _rel(lambda a, b: a == b, sympy.Eq)),
    "Less": ("lt", _rel(lambda a, b: a < b, sympy.Lt)),
    "LessOrEqual": ("le", _rel(lambda a, b: a <= b, sympy.Le)),
    "Greater": ("gt", _rel(lambda a, b: a > b, sympy.Gt)),
    "GreaterOrEqual": ("ge", _rel(lambda a, b: a >= b, sympy.Ge)),
}
LOGICAL = {
    "And": ("logical_and", lambda a, b: sympy.And(a, b) if _undecided(a, b) else a and b),
    "Or": ("logical_or", lambda a, b: sympy.Or(a, b) if _undecided(a, b) else a or b),
    "Xor": ("logical_xor", lambda a, b: sympy.Xor(a, b) if _undecided(a, b) else a != b),
}
UNARY = {
    "Neg": "neg", "Abs": "abs", "Exp": "exp", "Log": "log", "Sqrt": "sqrt", "Tanh": "tanh",
    "Erf": "erf", "Sigmoid": "sigmoid", "Relu": "relu", "Sin": "sin", "Cos": "cos",
    "Floor": "floor", "Ceil": "ceil", "Sign": "sign", "Not": "logical_not",
}
UNARY_KNOWN = {
    "Neg": lambda a: -a,
    "Abs": abs,
    "Floor": lambda a: sympy.floor(a) if isinstance(a, sympy.Basic) else math.floor(a),
    "Ceil": lambda a: sympy.ceiling(a) if isinstance(a, sympy.Basic) else math.ceil(a),
    "Sqrt": lambda a: math.sqrt(a) if not isinstance(a, sympy.Basic) else sympy.sqrt(a),
    "Not": lambda a: sympy.Not(a) if isinstance(a, sympy.Basic) else not a,
    "Relu": lambda a: sym_max(a, 0),
    "Sign": lambda a: sympy.sign(a) if isinstance(a, sympy.Basic) else (a > 0) - (a < 0),
}


def _undecided(*xs) -> bool:
    return any(isinstance(x, sympy.Basic) for x in xs)


def _known_binary(cx, node, fn, out_dtype=None):
    ks = all_known(cx, node)
    if ks is None or any(k is None for k in ks):
        return None
    a, b = ks
    shape = np.broadcast_shapes(a.shape, b.shape)
    if int(np.prod(shape, dtype=object)) > KNOWN_MAX:
        return None
    try:
        return Known(vec_map(fn, a.data, b.data), out_dtype or a.dtype)
    except ZeroDivisionError as e:
        raise cx.fail(str(e)) from None


def _binary(ir_op: str, known_fn: Callable) -> Converter:
    def convert(cx, node):
        k = _known_binary(cx, node, known_fn)
        if k is not None:
            return [k]
        a, b = cx.value(node.input(0)), cx.value(node.input(1))
        return [cx.op(ir_op, a, b)]

    return convert


def _compare(ir_op: str, known_fn: Callable) -> Converter:
    def convert(cx, node):
        k = _known_binary(cx, node, known_fn, DType.bool)
        if k is not None:
            return [k]
        return [cx.op(ir_op, cx.value(node.input(0)), cx.value(node.input(1)))]

    return convert


for _name, (_op, _fn) in {**ARITH, **LOGICAL}.items():
    if _name != "Add":
        onnx_op(_name)(_binary(_op, _fn))


@onnx_op("Add")
def _add(cx, node):
    """Add; ``MatMul(x, W) + b`` with a 1-D constant bias (how ``torch.onnx.export`` spells
    ``nn.Linear``) becomes one ``linear`` with that bias."""
    k = _known_binary(cx, node, ARITH["Add"][1])
    if k is not None:
        return [k]
    a, b = cx.value(node.input(0)), cx.value(node.input(1))
    for i, (y, bias) in enumerate(((a, b), (b, a))):
        p = y.producer
        if p is not None and p.op == "linear" and (len(p.inputs) < 3 or p.inputs[2] is None) \
                and bias.is_const and bias.type.rank == 1 and bias.dtype == y.dtype \
                and dims_equal(bias.shape[0], y.shape[-1]) and cx.single_use(node.inputs[i]):
            if bias.num_uses or not cx.single_use(node.inputs[1 - i]):
                # the exporter stores equal biases once (zeros, mostly); the torch frontend
                # has one per layer, and merge-projections never moves a shared bias
                bias = cx.graph.add_constant(bias.const.clone(), bias.name)
            return [cx.op("linear", p.inputs[0], p.inputs[1], bias)]
    return [cx.op("add", a, b)]
for _name, (_op, _fn) in COMPARE.items():
    onnx_op(_name)(_compare(_op, _fn))


@onnx_op("Div")
def _div(cx, node):
    a0 = node.input(0)
    dtype = a0.dtype
    fn = (lambda a, b: a / b) if dtype.is_float else _tdiv
    k = _known_binary(cx, node, fn)
    if k is not None:
        return [k]
    a, b = cx.value(a0), cx.value(node.input(1))
    if dtype.is_float:
        return [cx.op("div", a, b)]
    # truncation toward zero: sign(a)·sign(b)·floor(|a| / |b|)
    q = cx.op("floor_div", cx.op("abs", a), cx.op("abs", b))
    return [cx.op("mul", cx.op("mul", cx.op("sign", a), cx.op("sign", b)), q)]


@onnx_op("Mod")
def _mod(cx, node):
    if node.attr("fmod", 0):
        raise cx.unsupported("Mod with fmod=1 (C fmod) has no IR op")
    k = _known_binary(cx, node, _imod)
    if k is not None:
        return [k]
    return [cx.op("remainder", cx.value(node.input(0)), cx.value(node.input(1)))]


@onnx_op("Pow")
def _pow(cx, node):
    base = node.input(0)
    k = _known_binary(cx, node, lambda a, b: a**b)
    if k is not None and not base.dtype.is_float:
        return [k]
    out = cx.op("pow", cx.value(base), cx.value(node.input(1)))
    return [cast(cx, out, base.dtype)]


def _variadic(ir_op: str, known_fn: Callable) -> Converter:
    def convert(cx, node):
        xs = [node.input(i) for i in range(len(node.inputs)) if node.has_input(i)]
        ks = [known(cx, x) for x in xs]
        if all(k is not None for k in ks):
            shape = np.broadcast_shapes(*[k.shape for k in ks])
            if int(np.prod(shape, dtype=object)) <= KNOWN_MAX:
                return [Known(reduce(lambda p, q: vec_map(known_fn, p, q), [k.data for k in ks]),
                              ks[0].dtype)]
        vals = [cx.value(x) for x in xs]
        out = vals[0]
        for v in vals[1:]:
            out = cx.op(ir_op, out, v)
        return [out]

    return convert


onnx_op("Max")(_variadic("maximum", sym_max))
onnx_op("Min")(_variadic("minimum", sym_min))
onnx_op("Sum")(_variadic("add", lambda a, b: a + b))


@onnx_op(*UNARY)
def _unary(cx, node):
    x = node.input(0)
    k = known(cx, x)
    fn = UNARY_KNOWN.get(node.op_type)
    if k is not None and fn is not None and isinstance(x, Known):
        return [Known(vec_map(fn, k.data), k.dtype)]
    v = cx.value(x)
    if node.op_type == "Sign" and v.dtype == DType.bool:
        return [v]
    return [cx.op(UNARY[node.op_type], v)]


@onnx_op("Reciprocal")
def _reciprocal(cx, node):
    v = cx.value(node.input(0))
    p = v.producer
    if p is not None and p.op == "sqrt":  # torch's rsqrt is exported as Sqrt + Reciprocal
        return [cx.op("rsqrt", p.inputs[0])]
    return [cx.op("reciprocal", v)]
