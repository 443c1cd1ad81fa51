"""The ONNX -> IR table: one converter per ONNX op type (default domain and com.microsoft).

A converter is ``fn(cx, node) -> [output, ...]`` where ``node`` is an :class:`OnnxNode`
(op type, attributes, ``node.input(i)``) and ``cx`` the frontend's converter
(``transfuse.frontend.onnx._Converter``): ``cx.value(x)`` makes any input an IR
value, ``cx.op(...)`` creates an IR node carrying the node's provenance,
``cx.fail(msg)`` / ``cx.unsupported(msg)`` build errors naming the node. An output is
an IR :class:`Value`, a :class:`Known`, or ``None`` (an optional output transfuse
does not produce; reading it later is an error).

Known values. Shape computations are evaluated at capture: ``Shape`` gives a
:class:`Known` (a small array of ints and sympy dims such as ``[batch, seq, 768]``),
and the ops of shape arithmetic (Gather, Slice, Concat, Unsqueeze, Squeeze, Reshape,
Cast, Add/Sub/Mul/Div/Mod, Max/Min, comparisons, Where, Range, ConstantOfShape, ...)
compute Known results from Known inputs (each such op has a ``known`` evaluator).
Small constants are Known too. Ops that need a shape (Reshape, Expand, Range, Slice,
ConstantOfShape, Tile, Split, ...) read it from a Known input and put it in the IR
op's attrs; a shape input that is not Known is a :class:`CaptureError`. A Known used
as data becomes a constant, or for symbolic entries ``shape_of`` arithmetic.

Spellings kept close to what the torch frontend produces, so the passes see the
same IR: ``MatMul``/``Gemm`` with a constant 2-D weight -> ``linear`` (the weight
transposed once, shared); ``Gather`` of a 2-D constant on axis 0 -> ``embedding``;
``Reciprocal(Sqrt(x))`` -> ``rsqrt``; ``Expand`` of a one-element constant -> ``full``;
``Range`` -> ``arange``; ``Trilu`` -> ``tril``/``triu``; ``GatherND`` -> the
``aten::index.Tensor`` fallback (Hugging Face's mask functions); a Reshape of a
Transpose of a Reshape that only moves trailing dims -> one ``permute`` (the
exporter's rank-agnostic key transpose); ``Where(IsNaN(Softmax(s + where(m, 0, c))),
0, ·)`` with a finite ``c`` -> the softmax itself (the row of a finite mask is never
all -inf, so the guard is the identity).

Glossary for attention: B batch, H heads, S query length, T key length, D head dim.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from functools import reduce
from typing import Any

import numpy as np
import onnx
import sympy
import torch

from transfuse.frontend.aten_table import sym_value
from transfuse.frontend.onnx_external import ONNX_TO_DTYPE, dtype_of, tensor_from_proto
from transfuse.ir.graph import Value
from transfuse.ir.types import (
    DType,
    TensorType,
    broadcast_shapes,
    dim_product,
    dims_equal,
    normalize_dim,
)

KNOWN_MAX = 1024  # elements of a Known value (shape plumbing stays small)
INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)
MS = "com.microsoft"

Converter = Callable[[Any, "OnnxNode"], Any]
TABLE: dict[tuple[str, str], Converter] = {}


def onnx_op(*names: str, domain: str = "") -> Callable[[Converter], Converter]:
    """Register a converter for op types of ``domain`` ("" is the default ONNX domain)."""

    def deco(fn: Converter) -> Converter:
        for name in names:
            if (domain, name) in TABLE:
                raise ValueError(f"ONNX op {domain}.{name} registered twice")
            TABLE[(domain, name)] = fn
        return fn

    return deco


def lookup(domain: str, op_type: str) -> Converter | None:
    return TABLE.get(("" if domain == "ai.onnx" else domain, op_type))


def supported_ops() -> list[str]:
    return sorted(f"{d}.{n}" if d else n for d, n in TABLE)


def node_label(n: onnx.NodeProto, index: int) -> str:
    op = f"{n.domain}.{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
    return f"node {n.name!r} ({op})" if n.name else f"node #{index} ({op})"


class Missing:
    """An output transfuse does not produce (an unused optional output); reading it fails."""

    def __init__(self, reason: str):
        self.reason = reason


class OnnxNode:
    """An ONNX node with decoded attributes and its inputs read from the converter."""

    def __init__(self, proto: onnx.NodeProto, index: int, version: int, cx):
        self.proto = proto
        self.op_type = proto.op_type
        self.domain = "" if proto.domain == "ai.onnx" else proto.domain
        self.name = proto.name
        self.version = version
        self.label = node_label(proto, index)
        self.inputs = list(proto.input)
        self.outputs = list(proto.output)
        self.attrs = {a.name: _attr(a) for a in proto.attribute}
        self._cx = cx

    def attr(self, name: str, default: Any = None) -> Any:
        return self.attrs.get(name, default)

    def has_input(self, i: int) -> bool:
        return i < len(self.inputs) and bool(self.inputs[i])

    def input(self, i: int) -> Any:
        """The converted input ``i`` (Value or Known), or None when absent."""
        return self._cx.lookup(self.inputs[i]) if self.has_input(i) else None

    def used(self, k: int) -> bool:
        return k < len(self.outputs) and bool(self.outputs[k])


def _attr(a: onnx.AttributeProto) -> Any:
    v = onnx.helper.get_attribute_value(a)
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, list) and v and isinstance(v[0], bytes):
        return [x.decode("utf-8", "replace") for x in v]
    return v


# -- Known values ---------------------------------------------------------------------------


def _elem(x: Any, dtype: DType) -> Any:
    """One element of a Known, as the dtype holds it: python int/float/bool, or sympy."""
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, sympy.logic.boolalg.BooleanAtom):
        x = bool(x)
    if dtype == DType.bool:
        if isinstance(x, sympy.Basic):
            if x.is_Number:
                return bool(x != 0)
            if isinstance(x, sympy.Expr) and x.is_positive:
                return True
            return x  # an undecided relation
        return bool(x)
    if dtype.is_float:
        if isinstance(x, sympy.Basic):
            return float(x) if x.is_Number else x
        return float(x)
    if isinstance(x, sympy.Basic) and not isinstance(x, sympy.Expr):
        return x  # an undecided relation cast to int: stays undecided
    if isinstance(x, sympy.Basic):
        if x.is_Number:
            return int(x)
        e = sympy.expand(x)
        return int(e) if e.is_Integer else e
    if isinstance(x, float):
        if not math.isfinite(x):
            raise ValueError(f"cannot hold {x} in an integer type")
        return int(x)
    return int(x)


def _vec(fn: Callable, *arrays: np.ndarray) -> np.ndarray:
    arrays = np.broadcast_arrays(*[np.asarray(a, dtype=object) for a in arrays])
    out = np.empty(arrays[0].shape, dtype=object)
    for idx in np.ndindex(out.shape):
        out[idx] = fn(*(a[idx] for a in arrays))
    return out


def _obj(data: Any) -> np.ndarray:
    if isinstance(data, np.ndarray):
        return data.astype(object)
    arr = np.empty((), dtype=object) if not isinstance(data, (list, tuple)) else None
    if arr is not None:
        arr[()] = data
        return arr
    return np.array(data, dtype=object)


class Known:
    """A tensor whose contents are known at capture: ints, floats, bools or sympy dims."""

    __slots__ = ("data", "dtype")

    def __init__(self, data: Any, dtype: DType):
        self.dtype = dtype
        self.data = _vec(lambda e: _elem(e, dtype), _obj(data))

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> Known:
        dtype = DType.from_torch(t.dtype)
        if dtype in (DType.bf16, DType.f8e4m3, DType.f8e5m2, DType.f16):
            t = t.float()
        return cls(np.array(t.tolist(), dtype=object) if t.dim() else t.item(), dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def type(self) -> TensorType:
        return TensorType(self.dtype, self.shape)

    def elements(self) -> list:
        return list(self.data.reshape(-1))

    @property
    def is_concrete(self) -> bool:
        return not any(isinstance(e, sympy.Basic) for e in self.elements())

    def tensor(self) -> torch.Tensor:
        return torch.tensor(self.data.tolist(), dtype=self.dtype.torch)

    def __repr__(self) -> str:
        return f"Known({self.data.tolist()!r}, {self.dtype})"


def known(cx, x: Any) -> Known | None:
    """``x`` as a Known when its contents are known at capture (small constants included)."""
    if isinstance(x, Known):
        return x
    if isinstance(x, Value) and x.is_const and x.const.numel() <= KNOWN_MAX:
        key = ("known", id(x))
        if key not in cx.cache:
            cx.cache[key] = Known.from_tensor(x.const)
        return cx.cache[key]
    return None


def materialize(cx, k: Known) -> Value:
    """A Known as an IR value: a constant, or shape arithmetic from ``shape_of``."""
    key = ("materialized", k.dtype, k.shape, repr(k.data.tolist()))
    if key in cx.cache:
        return cx.cache[key]
    if k.is_concrete:
        try:
            t = k.tensor()
        except (OverflowError, RuntimeError) as e:
            raise cx.fail(f"the value {k.data.tolist()} does not fit {k.dtype}: {e}") from None
        v = cx.add_weight(t, "c")
    else:
        parts = []
        for e in k.elements():
            if isinstance(e, sympy.Basic):
                if not isinstance(e, sympy.Expr):
                    raise cx.fail(f"a value depends on the undecided condition {e}")
                parts.append(sym_value(cx, e, k.dtype))
            else:
                parts.append(cx.const(e, k.dtype))
        if not k.shape:
            v = parts[0]
        else:
            parts = [cx.op("reshape", p, shape=[1]) for p in parts]
            v = parts[0] if len(parts) == 1 else cx.emit("concat", parts, {"axis": 0})
            if len(k.shape) != 1:
                v = cx.op("reshape", v, shape=list(k.shape))
    cx.cache[key] = v
    return v


def known_ints(cx, node: OnnxNode, i: int, what: str) -> list:
    """Input ``i`` as a list of ints / sympy dims (0-d or 1-D Known), or a CaptureError."""
    k = known(cx, node.input(i))
    if k is None:
        raise cx.fail(f"its {what} (input {i}, {node.inputs[i]!r}) is not known at capture: it "
                      "depends on tensor values, not only on shapes, so transfuse cannot put it "
                      "in the graph's shapes")
    if k.dtype.is_float or k.dtype == DType.bool or len(k.shape) > 1:
        raise cx.fail(f"its {what} must be a 0-d or 1-D integer tensor, got {k.type}")
    for e in k.elements():
        if isinstance(e, sympy.Basic) and not isinstance(e, sympy.Expr):
            raise cx.fail(f"its {what} depends on the undecided condition {e}")
    return k.elements()


def known_scalar(cx, node: OnnxNode, i: int, what: str) -> Any:
    k = known(cx, node.input(i))
    if k is None or len(k.elements()) != 1:
        raise cx.fail(f"its {what} (input {i}) must be a single value known at capture")
    return k.elements()[0]


def _all_known(cx, node: OnnxNode) -> list[Known | None] | None:
    ks = []
    for i in range(len(node.inputs)):
        if not node.has_input(i):
            ks.append(None)
            continue
        k = known(cx, node.input(i))
        if k is None:
            return None
        ks.append(k)
    return ks


def _small(k: Known | None) -> Known | None:
    return k if k is not None and k.data.size <= KNOWN_MAX else None


def _is_concrete_shape(shape: Sequence) -> bool:
    return all(isinstance(d, int) for d in shape)


# -- small helpers ----------------------------------------------------------------------------


def value_type(x: Any) -> TensorType:
    return x.type


def rank(x: Any) -> int:
    return len(x.shape)


def axis_of(cx, axis: int, r: int) -> int:
    if not -max(r, 1) <= axis < max(r, 1):
        raise cx.fail(f"axis {axis} is out of range for rank {r}")
    return axis % max(r, 1)


def to_shape(cx, v: Value, shape: Sequence) -> Value:
    if v.type.rank == len(shape) and all(dims_equal(a, b) for a, b in zip(v.shape, shape)):
        return v
    return cx.op("reshape", v, shape=list(shape))


def _reshaped(cx, x: Any, shape: Sequence) -> Any:
    """``x`` viewed as ``shape``: a Known stays Known (shape plumbing), a value gets a reshape."""
    if isinstance(x, Known) and _is_concrete_shape(shape):
        return Known(x.data.reshape(list(shape)), x.dtype)
    return to_shape(cx, cx.value(x), shape)


def cast(cx, v: Value, dtype: DType) -> Value:
    return v if v.dtype == dtype else cx.op("cast", v, dtype=dtype)


def _check_shape_values(cx, dims: Sequence) -> list:
    out = []
    for d in dims:
        if isinstance(d, int) and not 0 <= d <= INT64_MAX:
            raise cx.fail(f"shape {list(dims)} has dim {d} outside [0, 2**63 - 1]")
        out.append(normalize_dim(d))
    total = dim_product([d for d in out])
    if isinstance(total, int) and total > INT64_MAX:
        raise cx.fail(f"shape {list(dims)} has {total} elements, which overflows int64")
    return out


def _dim_value(cx, d: Any) -> Value:
    """A dim (int or symbolic) as a 0-d i64 value."""
    return cx.const(d, DType.i64) if isinstance(d, int) else sym_value(cx, d, DType.i64)


def _wrap_index(cx, idx: Any, size: Any) -> Value:
    """Indices that may be negative made non-negative: constants at capture, else remainder."""
    k = known(cx, idx)
    if k is not None and k.is_concrete:
        vals = k.tensor().long()
        if isinstance(size, int):
            if ((vals < -size) | (vals >= size)).any():
                raise cx.fail(f"index out of range for a dim of size {size}")
            return cx.add_weight(torch.where(vals < 0, vals + size, vals).to(k.dtype.torch), "idx")
        if bool((vals >= 0).all()):
            return cx.value(idx)
    v = cx.value(idx)
    return cx.op("remainder", v, cast(cx, _dim_value(cx, size), v.dtype))


# -- elementwise ------------------------------------------------------------------------------


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


def _max(a, b):
    if isinstance(a, sympy.Basic) or isinstance(b, sympy.Basic):
        return sympy.Max(a, b)
    return max(a, b)


def _min(a, b):
    if isinstance(a, sympy.Basic) or isinstance(b, sympy.Basic):
        return sympy.Min(a, b)
    return min(a, b)


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
    "Relu": lambda a: _max(a, 0),
    "Sign": lambda a: sympy.sign(a) if isinstance(a, sympy.Basic) else (a > 0) - (a < 0),
}


def _undecided(*xs) -> bool:
    return any(isinstance(x, sympy.Basic) for x in xs)


def _known_binary(cx, node, fn, out_dtype=None):
    ks = _all_known(cx, node)
    if ks is None or any(k is None for k in ks):
        return None
    a, b = ks
    shape = np.broadcast_shapes(a.shape, b.shape)
    if int(np.prod(shape, dtype=object)) > KNOWN_MAX:
        return None
    try:
        return Known(_vec(fn, a.data, b.data), out_dtype or a.dtype)
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
                return [Known(reduce(lambda p, q: _vec(known_fn, p, q), [k.data for k in ks]),
                              ks[0].dtype)]
        vals = [cx.value(x) for x in xs]
        out = vals[0]
        for v in vals[1:]:
            out = cx.op(ir_op, out, v)
        return [out]

    return convert


onnx_op("Max")(_variadic("maximum", _max))
onnx_op("Min")(_variadic("minimum", _min))
onnx_op("Sum")(_variadic("add", lambda a, b: a + b))


@onnx_op(*UNARY)
def _unary(cx, node):
    x = node.input(0)
    k = known(cx, x)
    fn = UNARY_KNOWN.get(node.op_type)
    if k is not None and fn is not None and isinstance(x, Known):
        return [Known(_vec(fn, k.data), k.dtype)]
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


@onnx_op("IsNaN")
def _isnan(cx, node):
    v = cx.value(node.input(0))
    out = cx.op("ne", v, v)
    cx.cache[("isnan", id(out))] = v
    return [out]


@onnx_op("IsInf")
def _isinf(cx, node):
    v = cx.value(node.input(0))
    pos, neg = node.attr("detect_positive", 1), node.attr("detect_negative", 1)
    inf = cx.const(math.inf, v.dtype)
    if pos and neg:
        return [cx.op("eq", cx.op("abs", v), inf)]
    if pos:
        return [cx.op("eq", v, inf)]
    if neg:
        return [cx.op("eq", v, cx.const(-math.inf, v.dtype))]
    return [cx.op("full", shape=list(v.shape), value=0.0, dtype=DType.bool)]


@onnx_op("Where")
def _where(cx, node):
    ks = _all_known(cx, node)
    if ks is not None and all(k is not None for k in ks):
        c, a, b = ks
        shape = np.broadcast_shapes(c.shape, a.shape, b.shape)
        decided = all(isinstance(e, bool) for e in c.elements())
        if decided and int(np.prod(shape, dtype=object)) <= KNOWN_MAX:
            return [Known(_vec(lambda p, x, y: x if p else y, c.data, a.data, b.data), a.dtype)]
    cond = cx.value(node.input(0))
    src = cx.cache.get(("isnan", id(cond)))
    if src is not None and _is_zero(cx, node.input(1)) and node.input(2) is src \
            and _finite_masked_softmax(src):
        return [src]
    return [cx.op("where", cond, cx.value(node.input(1)), cx.value(node.input(2)))]


def _is_zero(cx, x) -> bool:
    k = known(cx, x)
    return k is not None and k.is_concrete and all(e == 0 for e in k.elements())


def _finite_const(v: Value | None) -> bool:
    while v is not None and v.producer is not None and v.producer.op == "cast":
        v = v.producer.inputs[0]
    return v is not None and v.is_const and v.dtype.is_float and bool(torch.isfinite(v.const).all())


def _finite_masked_softmax(v: Value) -> bool:
    """``v = softmax(matmul(..) + where(m, a, b))`` over the last axis with finite constants
    a, b (the scores optionally scaled by a finite constant): no row is all -inf, so the
    softmax of finite scores has no NaN."""
    p = v.producer
    if p is None or p.op != "softmax" or p.attrs["axis"] % v.type.rank != v.type.rank - 1:
        return False
    add = p.inputs[0].producer
    if add is None or add.op != "add":
        return False
    for m, scores in (add.inputs, add.inputs[::-1]):
        w = m.producer
        while w is not None and w.op in ("cast", "expand", "reshape"):
            w = w.inputs[0].producer
        if w is not None and w.op == "where" and _finite_const(w.inputs[1]) and \
                _finite_const(w.inputs[2]) and _scores(scores):
            return True
    return False


def _scores(v: Value) -> bool:
    """A matmul, possibly cast or scaled by a finite constant: no -inf of its own."""
    p = v.producer
    while p is not None and (p.op == "cast" or p.op in ("mul", "div") and
                             any(_finite_const(x) for x in p.inputs)):
        v = p.inputs[0] if p.op == "cast" or not _finite_const(p.inputs[0]) else p.inputs[1]
        p = v.producer
    return p is not None and p.op == "matmul"


# -- casts, identity, constants -------------------------------------------------------------


def _cast_to(cx, node, x, dtype: DType):
    k = known(cx, x)
    if isinstance(x, Known) or (k is not None and k.data.size <= 64 and not dtype.is_float
                                and not k.dtype.is_float):
        try:
            return Known(k.data, dtype)
        except (ValueError, TypeError):
            pass
    return cast(cx, cx.value(x), dtype)


@onnx_op("Cast")
def _cast(cx, node):
    to = node.attr("to")
    return [_cast_to(cx, node, node.input(0), dtype_of(to, f"the target type of {cx.where()}"))]


@onnx_op("CastLike")
def _castlike(cx, node):
    return [_cast_to(cx, node, node.input(0), node.input(1).dtype)]


@onnx_op("Identity")
def _identity(cx, node):
    return [node.input(0)]


@onnx_op("Dropout")
def _dropout(cx, node):
    if node.has_input(2):
        training = known(cx, node.input(2))
        if training is None or any(training.elements()):
            raise cx.fail("Dropout in training mode is random; export the model in eval mode")
    x = node.input(0)
    outs = [x]
    if node.used(1):
        outs.append(cx.op("full", shape=list(x.shape), value=1.0, dtype=DType.bool))
    return outs


def tensor_result(cx, t: torch.Tensor, hint: str) -> Any:
    if t.numel() <= KNOWN_MAX:
        return Known.from_tensor(t)
    return cx.add_weight(t, hint)


@onnx_op("Constant")
def _constant(cx, node):
    a = node.attrs
    if "value" in a:
        t = tensor_from_proto(a["value"], cx.base_dir, cx.budget)
    elif "value_float" in a:
        t = torch.tensor(a["value_float"], dtype=torch.float32)
    elif "value_floats" in a:
        t = torch.tensor(list(a["value_floats"]), dtype=torch.float32)
    elif "value_int" in a:
        t = torch.tensor(a["value_int"], dtype=torch.int64)
    elif "value_ints" in a:
        t = torch.tensor(list(a["value_ints"]), dtype=torch.int64)
    else:
        raise cx.unsupported(f"a Constant with {sorted(a)} (strings and sparse tensors are not "
                             "supported)")
    return [tensor_result(cx, t, node.outputs[0])]


@onnx_op("ConstantOfShape")
def _constant_of_shape(cx, node):
    shape = _check_shape_values(cx, known_ints(cx, node, 0, "shape"))
    value = node.attr("value")
    if value is not None:
        t = tensor_from_proto(value, cx.base_dir, cx.budget)
        if t.numel() != 1:
            raise cx.fail(f"value must hold one element, got {t.numel()}")
        dtype, fill = DType.from_torch(t.dtype), t.reshape(()).item()
    else:
        dtype, fill = DType.f32, 0.0
    if _is_concrete_shape(shape) and math.prod(shape) <= KNOWN_MAX:
        return [Known(np.full(shape, fill, dtype=object) if shape else fill, dtype)]
    return [_full(cx, shape, fill, dtype)]


def _full(cx, shape: list, fill: Any, dtype: DType) -> Value:
    if not dtype.is_float and isinstance(fill, int) and abs(fill) > 2**53:
        v = cx.const(fill, dtype)
        return v if not shape else cx.op("expand", v, shape=list(shape))
    return cx.op("full", shape=list(shape), value=float(fill), dtype=dtype)


# -- shapes --------------------------------------------------------------------------------


@onnx_op("Shape")
def _shape(cx, node):
    dims = list(node.input(0).shape)
    r = len(dims)
    start, end = node.attr("start", 0), node.attr("end", r)
    return [Known(np.array(dims[slice(*slice(start, end).indices(r))], dtype=object)
                  .reshape(-1), DType.i64)]


@onnx_op("Size")
def _size(cx, node):
    return [Known(dim_product(node.input(0).shape), DType.i64)]


def _resolve_reshape(cx, src: Sequence, target: list, allowzero: bool) -> list:
    out, infer = [], None
    for i, d in enumerate(target):
        if isinstance(d, int) and d == 0 and not allowzero:
            if i >= len(src):
                raise cx.fail(f"shape {target}: dim {i} is 0 (copy) but the input has rank "
                              f"{len(src)}")
            out.append(src[i])
        elif isinstance(d, int) and d == -1:
            if infer is not None:
                raise cx.fail(f"shape {target} has two -1 dims")
            infer = i
            out.append(None)
        elif isinstance(d, int) and d < 0:
            raise cx.fail(f"shape {target} has the negative dim {d}")
        else:
            out.append(d)
    if infer is not None:
        rest = dim_product([d for d in out if d is not None])
        total = dim_product(src)
        if isinstance(rest, int) and rest == 0:
            raise cx.fail(f"shape {target}: cannot infer the -1 dim next to a 0 dim")
        q = sympy.cancel(sympy.sympify(total) / sympy.sympify(rest))
        if sympy.fraction(q)[1] != 1 or (q.is_Number and not q.is_Integer):
            raise cx.fail(f"cannot reshape {list(src)} to {target}: {total} elements do not "
                          f"divide by {rest}")
        out[infer] = normalize_dim(q)
    out = _check_shape_values(cx, out)
    if not dims_equal(dim_product(out), dim_product(src)):
        raise cx.fail(f"cannot reshape {list(src)} to {out}: the element counts differ")
    return out


@onnx_op("Reshape")
def _reshape(cx, node):
    x = node.input(0)
    target = known_ints(cx, node, 1, "shape")
    shape = _resolve_reshape(cx, x.shape, target, bool(node.attr("allowzero", 0)))
    if isinstance(x, Known):
        return [_reshaped(cx, x, shape)]
    v = cx.value(x)
    folded = _permute_through_reshapes(cx, v, shape)
    return [folded if folded is not None else to_shape(cx, v, shape)]


def _permute_through_reshapes(cx, v: Value, dst: list) -> Value | None:
    """reshape(permute(reshape(x, [M, *rest]), [0, *p]), dst) == permute(x, perm) when M merges
    x's leading dims, rest are x's trailing dims and dst splits M back."""
    p = v.producer
    if p is None or p.op != "permute":
        return None
    r = p.inputs[0].producer
    if r is None or r.op != "reshape":
        return None
    x, mid, perm = r.inputs[0], r.outputs[0].shape, list(p.attrs["perm"])
    k = x.type.rank - (len(mid) - 1)
    if k < 1 or perm[0] != 0 or not dims_equal(dim_product(x.shape[:k]), mid[0]):
        return None
    if not all(dims_equal(a, b) for a, b in zip(x.shape[k:], mid[1:])):
        return None
    new = list(range(k)) + [k + q - 1 for q in perm[1:]]
    want = [x.shape[q] for q in new]
    if len(want) != len(dst) or not all(dims_equal(a, b) for a, b in zip(want, dst)):
        return None
    return x if new == sorted(new) else cx.op("permute", x, perm=new)


@onnx_op("Flatten")
def _flatten(cx, node):
    x = node.input(0)
    r = rank(x)
    axis = node.attr("axis", 1)
    axis = axis + r if axis < 0 else axis
    if not 0 <= axis <= r:
        raise cx.fail(f"axis {node.attr('axis', 1)} out of range for rank {r}")
    shape = [dim_product(x.shape[:axis]), dim_product(x.shape[axis:])]
    return [_reshaped(cx, x, shape)]


def _axes_arg(cx, node: OnnxNode, i: int) -> list[int] | None:
    """Axes from input ``i`` (newer opsets) or the ``axes`` attribute; None when absent."""
    if node.has_input(i):
        axes = known_ints(cx, node, i, "axes")
        if not all(isinstance(a, int) for a in axes):
            raise cx.fail(f"axes {axes} must be static")
        return axes
    a = node.attr("axes")
    return None if a is None else list(a)


@onnx_op("Squeeze")
def _squeeze(cx, node):
    x = node.input(0)
    r = rank(x)
    axes = _axes_arg(cx, node, 1)
    if axes is None or not axes:
        drop = {i for i, d in enumerate(x.shape) if isinstance(d, int) and d == 1}
    else:
        drop = {axis_of(cx, a, r) for a in axes}
        bad = [i for i in drop if not (isinstance(x.shape[i], int) and x.shape[i] == 1)]
        if bad:
            raise cx.fail(f"cannot squeeze axes {sorted(bad)} of {list(x.shape)}: not size 1")
    shape = [d for i, d in enumerate(x.shape) if i not in drop]
    return [_reshaped(cx, x, shape)]


@onnx_op("Unsqueeze")
def _unsqueeze(cx, node):
    x = node.input(0)
    axes = _axes_arg(cx, node, 1) or []
    out_rank = rank(x) + len(axes)
    axes = sorted(axis_of(cx, a, out_rank) for a in axes)
    if len(set(axes)) != len(axes):
        raise cx.fail(f"axes {axes} repeat")
    dims = iter(x.shape)
    shape = [1 if i in axes else next(dims) for i in range(out_rank)]
    return [_reshaped(cx, x, shape)]


@onnx_op("Transpose")
def _transpose(cx, node):
    x = node.input(0)
    r = rank(x)
    perm = list(node.attr("perm", list(range(r))[::-1]))
    if sorted(perm) != list(range(r)):
        raise cx.fail(f"perm {perm} is not a permutation of {r} axes")
    if isinstance(x, Known):
        return [Known(np.transpose(x.data, perm), x.dtype)]
    v = cx.value(x)
    return [v if perm == list(range(r)) else cx.op("permute", v, perm=perm)]


@onnx_op("Expand")
def _expand(cx, node):
    x = node.input(0)
    target = _check_shape_values(cx, known_ints(cx, node, 1, "shape"))
    try:
        out = list(broadcast_shapes(tuple(x.shape), tuple(target)))
    except Exception as e:  # noqa: BLE001
        raise cx.fail(f"cannot expand {list(x.shape)} to {target}: {e}") from None
    k = known(cx, x)
    if k is not None and _is_concrete_shape(out) and math.prod(out) <= KNOWN_MAX:
        return [Known(np.broadcast_to(k.data, out), k.dtype)]
    if all(dims_equal(a, b) for a, b in zip(x.shape, out)) and rank(x) == len(out):
        return [x]
    if k is not None and k.data.size == 1 and k.is_concrete:  # torch.ones / full
        return [_full(cx, out, k.elements()[0], k.dtype)]
    v = cx.value(x)
    return [cx.op("expand", to_shape(cx, v, [1] * (len(out) - v.type.rank) + list(v.shape))
                  if v.type.rank < len(out) else v, shape=out)]


@onnx_op("Concat")
def _concat(cx, node):
    xs = [node.input(i) for i in range(len(node.inputs)) if node.has_input(i)]
    r = rank(xs[0])
    axis = axis_of(cx, node.attr("axis"), r)
    ks = [known(cx, x) for x in xs]
    if all(k is not None for k in ks) and sum(k.data.size for k in ks) <= KNOWN_MAX:
        return [Known(np.concatenate([k.data for k in ks], axis=axis), ks[0].dtype)]
    vals = [cx.value(x) for x in xs]
    vals = [v for v in vals if not (isinstance(v.shape[axis], int) and v.shape[axis] == 0)] \
        or vals[:1]
    return [vals[0] if len(vals) == 1 else cx.emit("concat", vals, {"axis": axis})]


@onnx_op("Split")
def _split(cx, node):
    x = node.input(0)
    r = rank(x)
    axis = axis_of(cx, node.attr("axis", 0), r)
    size = x.shape[axis]
    n = len(node.outputs)
    if node.has_input(1):
        sizes = known_ints(cx, node, 1, "split sizes")
    elif node.attr("split") is not None:
        sizes = list(node.attr("split"))
    else:
        parts = node.attr("num_outputs", n)
        if isinstance(size, int):
            chunk = -(-size // parts)
            sizes = [min(chunk, size - i * chunk) for i in range(parts)]
        else:
            chunk = normalize_dim(size / parts) if sympy.fraction(sympy.cancel(
                size / parts))[1] == 1 else None
            if chunk is None:
                raise cx.fail(f"cannot split the symbolic dim {size} into {parts} equal parts")
            sizes = [chunk] * parts
    if len(sizes) != n:
        raise cx.fail(f"{len(sizes)} split sizes for {n} outputs")
    if not dims_equal(normalize_dim(sum(sizes)), size):
        raise cx.fail(f"split sizes {sizes} do not add up to dim {axis} ({size})")
    if isinstance(x, Known):
        bounds = np.cumsum([0] + sizes)
        return [Known(np.take(x.data, range(int(a), int(b)), axis=axis), x.dtype)
                for a, b in zip(bounds[:-1], bounds[1:])]
    v = cx.value(x)
    if n == 1:
        return [v]
    return list(cx.emit("split", [v], {"axis": axis, "sizes": sizes}))


def _clamp_index(i: Any, size: Any, step: int, is_end: bool) -> Any:
    """ONNX Slice's start/end clamping for one axis (python slice semantics)."""
    if isinstance(i, int) and isinstance(size, int):
        s = slice(i if not is_end else None, i if is_end else None, step)
        start, stop, _ = s.indices(size)
        return stop if is_end else start
    if isinstance(i, int):
        if i >= INT64_MAX // 2:
            return size if step > 0 else size - 1
        if i < 0:
            return normalize_dim(size + i) if i > INT64_MIN // 2 else (0 if step > 0 else -1)
        return normalize_dim(sympy.Min(i, size))
    return normalize_dim(i)


@onnx_op("Slice")
def _slice(cx, node):
    x = node.input(0)
    r = rank(x)
    starts = known_ints(cx, node, 1, "starts")
    ends = known_ints(cx, node, 2, "ends")
    axes = known_ints(cx, node, 3, "axes") if node.has_input(3) else list(range(len(starts)))
    steps = known_ints(cx, node, 4, "steps") if node.has_input(4) else [1] * len(starts)
    if not (len(starts) == len(ends) == len(axes) == len(steps)):
        raise cx.fail("starts, ends, axes and steps differ in length")
    if not all(isinstance(a, int) for a in axes) or not all(isinstance(s, int) and s != 0
                                                            for s in steps):
        raise cx.fail(f"axes {axes} and steps {steps} must be static and steps non-zero")
    axes = [axis_of(cx, a, r) for a in axes]
    if len(set(axes)) != len(axes):
        raise cx.fail(f"axes {axes} repeat")
    if isinstance(x, Known):
        index = [slice(None)] * r
        if all(isinstance(v, int) for v in starts + ends):
            for a, s, e, st in zip(axes, starts, ends, steps):
                index[a] = slice(s, e, st)
            return [Known(x.data[tuple(index)], x.dtype)]
    v = cx.value(x)
    for a, s, e, st in zip(axes, starts, ends, steps):
        size = v.shape[a]
        if st < 0:
            v = _reverse_slice(cx, v, a, s, e, st)
            continue
        start = _clamp_index(s, size, st, False)
        end = _clamp_index(e, size, st, True)
        if isinstance(start, int) and start == 0 and dims_equal(end, size) and st == 1:
            continue
        v = cx.op("slice", v, axis=a, start=start, end=end, step=st)
    return [v]


def _reverse_slice(cx, v: Value, axis: int, s: Any, e: Any, step: int) -> Value:
    size = v.shape[axis]
    if not (isinstance(size, int) and isinstance(s, int) and isinstance(e, int)):
        raise cx.fail("a negative slice step needs a static dim and static bounds")
    idx = list(range(size))[slice(s, e, step)]
    index = cx.add_weight(torch.tensor(idx, dtype=torch.int64), "rev")
    return cx.op("index_select", v, index, axis=axis)


@onnx_op("Tile")
def _tile(cx, node):
    x = node.input(0)
    reps = known_ints(cx, node, 1, "repeats")
    if len(reps) != rank(x):
        raise cx.fail(f"{len(reps)} repeats for rank {rank(x)}")
    out = [normalize_dim(r * d) for r, d in zip(reps, x.shape)]
    k = known(cx, x)
    if isinstance(x, Known) and all(isinstance(r, int) for r in reps) and \
            _is_concrete_shape(out) and math.prod(out) <= KNOWN_MAX:
        return [Known(np.tile(k.data, reps), k.dtype)]
    v = cx.value(x)
    if all(isinstance(r, int) and r == 1 for r in reps):
        return [v]
    inter = [q for d in v.shape for q in (1, d)]
    big = [q for r, d in zip(reps, v.shape) for q in (r, d)]
    y = cx.op("expand", to_shape(cx, v, inter), shape=big)
    return [to_shape(cx, y, out)]


# -- gathers -----------------------------------------------------------------------------------


@onnx_op("Gather")
def _gather(cx, node):
    x, idx = node.input(0), node.input(1)
    r = rank(x)
    axis = axis_of(cx, node.attr("axis", 0), r)
    kx, ki = known(cx, x), known(cx, idx)
    if kx is not None and ki is not None and ki.is_concrete:
        size = kx.shape[axis]
        flat = [int(i) + size if int(i) < 0 else int(i) for i in ki.elements()]
        if any(not 0 <= i < size for i in flat):
            raise cx.fail(f"index out of range for axis {axis} of size {size}")
        taken = _obj(np.take(kx.data, np.array(flat, dtype=np.int64).reshape(ki.shape),
                             axis=axis))
        if taken.size <= KNOWN_MAX:
            return [Known(taken, kx.dtype)]
    v = cx.value(x)
    if axis == 0 and r == 2 and v.is_const and ki is None and isinstance(idx, Value):
        return [cx.op("embedding", v, idx)]  # token ids are >= 0 (negative ones raise)
    index = _wrap_index(cx, idx, v.shape[axis])
    irank = index.type.rank
    out_shape = list(v.shape[:axis]) + list(index.shape) + list(v.shape[axis + 1:])
    if irank == 0:
        i = known(cx, index)
        if i is not None and i.is_concrete:
            j = int(i.elements()[0])
            y = cx.op("slice", v, axis=axis, start=j, end=j + 1, step=1)
        else:
            y = cx.op("index_select", v, to_shape(cx, index, [1]), axis=axis)
        return [to_shape(cx, y, out_shape)]
    if irank == 1:
        return [cx.op("index_select", v, index, axis=axis)]
    flat = to_shape(cx, index, [dim_product(index.shape)])
    return [to_shape(cx, cx.op("index_select", v, flat, axis=axis), out_shape)]


@onnx_op("GatherElements")
def _gather_elements(cx, node):
    v = cx.value(node.input(0))
    axis = axis_of(cx, node.attr("axis", 0), v.type.rank)
    index = _wrap_index(cx, node.input(1), v.shape[axis])
    return [cx.op("gather", v, index, axis=axis)]


@onnx_op("GatherND")
def _gather_nd(cx, node):
    """data[i_0, .., i_{k-1}] with the k index components stacked in the last axis of
    ``indices``: the ``aten::index.Tensor`` fallback the torch frontend keeps for advanced
    indexing (so the mask analysis reads the components, e.g. arange-based ones)."""
    x, idx = cx.value(node.input(0)), cx.value(node.input(1))
    nb = node.attr("batch_dims", 0)
    k = idx.shape[-1] if idx.type.rank else None
    if not isinstance(k, int) or not 1 <= k <= x.type.rank - nb or idx.type.rank <= nb:
        raise cx.fail(f"indices {idx.type} must have a static last dim in "
                      f"[1, {x.type.rank - nb}] (batch_dims={nb})")
    lead = list(idx.shape[:-1])
    comps = _stacked_components(idx, k)
    if comps is None:
        parts = [idx] if k == 1 else list(cx.emit("split", [idx], {"axis": idx.type.rank - 1,
                                                                    "sizes": [1] * k}))
        comps = [to_shape(cx, p, lead) for p in parts]
    comps = [cast(cx, c, DType.i64) for c in comps]
    batch = []  # batch_dims: index the leading dims with their own position
    for b in range(nb):
        shape = [1] * len(lead)
        shape[b] = x.shape[b]
        pos = cx.op("arange", start=0, end=x.shape[b], step=1, dtype=DType.i64)
        batch.append(to_shape(cx, pos, shape))
    comps = batch + comps
    k += nb
    out = TensorType(x.dtype, lead + list(x.shape[k:]))
    args = {"args": [{"$in": 0}, [{"$in": i + 1} for i in range(k)]], "kwargs": {}}
    return [cx.emit("torch_fallback", [x, *comps],
                    {"target": "aten::index.Tensor", "args": json.dumps(args)}, out_types=[out])]


def _stacked_components(idx: Value, k: int) -> list[Value] | None:
    """The components of ``concat([unsqueeze(c_0, -1), ..], axis=-1)``, when idx is that."""
    p = idx.producer
    lead = idx.shape[:-1]
    if p is None or p.op != "concat" or p.attrs["axis"] % idx.type.rank != idx.type.rank - 1 \
            or len(p.inputs) != k:
        return None
    comps = []
    for part in p.inputs:
        if part.shape[-1] != 1:
            return None
        q = part.producer
        src = q.inputs[0] if q is not None and q.op == "reshape" else None
        if src is None or src.type.rank != len(lead) or not all(
                dims_equal(a, b) for a, b in zip(src.shape, lead)):
            return None
        comps.append(src)
    return comps


# -- creation ------------------------------------------------------------------------------


@onnx_op("Range")
def _range(cx, node):
    start = known_scalar(cx, node, 0, "start")
    limit = known_scalar(cx, node, 1, "limit")
    delta = known_scalar(cx, node, 2, "delta")
    dtype = node.input(0).dtype
    values = (start, limit, delta)
    if all(not isinstance(v, sympy.Basic) for v in values):
        if delta == 0:
            raise cx.fail("delta is 0")
        t = torch.arange(start, limit, delta, dtype=torch.float64 if dtype.is_float
                         else torch.int64).to(dtype.torch)
        return [tensor_result(cx, t, "range")]
    as_int = [int(v) if isinstance(v, float) and v.is_integer() else v for v in values]
    if not isinstance(as_int[2], int) or as_int[2] <= 0 or any(isinstance(v, float)
                                                               for v in as_int):
        raise cx.fail(f"Range({start}, {limit}, {delta}) over a symbolic size needs integral "
                      "bounds and a positive static step")
    return [cx.op("arange", start=as_int[0], end=as_int[1], step=as_int[2], dtype=dtype)]


@onnx_op("Trilu")
def _trilu(cx, node):
    k = known_scalar(cx, node, 1, "diagonal k") if node.has_input(1) else 0
    if not isinstance(k, int):
        raise cx.fail(f"diagonal {k} must be static")
    op = "triu" if node.attr("upper", 1) else "tril"
    return [cx.op(op, cx.value(node.input(0)), diagonal=k)]


@onnx_op("CumSum")
def _cumsum(cx, node):
    v = cx.value(node.input(0))
    axis = axis_of(cx, known_scalar(cx, node, 1, "axis"), v.type.rank)
    size = v.shape[axis]
    if node.attr("reverse", 0):
        if not isinstance(size, int):
            raise cx.unsupported("CumSum with reverse=1 over a symbolic dim")
        rev = cx.add_weight(torch.arange(size - 1, -1, -1, dtype=torch.int64), "rev")
        v = cx.op("index_select", v, rev, axis=axis)
    x = v
    if node.attr("exclusive", 0):  # shift right by one: [0, x_0, .., x_{n-2}]
        shape = list(v.shape)
        shape[axis] = 1
        zero = cx.op("full", shape=shape, value=0.0, dtype=v.dtype)
        if not (isinstance(size, int) and size <= 1):
            head = cx.op("slice", v, axis=axis, start=0, end=normalize_dim(size - 1), step=1)
            x = cx.emit("concat", [zero, head], {"axis": axis})
        else:
            x = zero if isinstance(size, int) and size == 1 else v
    out = cx.op("cumsum", x, axis=axis, dtype=v.dtype)
    if node.attr("reverse", 0):
        out = cx.op("index_select", out, rev, axis=axis)
    return [out]


# -- reductions, softmax, norms ----------------------------------------------------------------

REDUCE = {"ReduceSum": "reduce_sum", "ReduceMean": "reduce_mean", "ReduceMax": "reduce_max",
          "ReduceMin": "reduce_min", "ReduceProd": None}
_REDUCE_KNOWN = {"ReduceSum": lambda a, b: a + b, "ReduceMax": _max, "ReduceMin": _min,
                 "ReduceProd": lambda a, b: a * b}


@onnx_op(*REDUCE)
def _reduce(cx, node):
    x = node.input(0)
    r = rank(x)
    axes = _axes_arg(cx, node, 1)
    keep = bool(node.attr("keepdims", 1))
    if not axes:
        if node.attr("noop_with_empty_axes", 0):
            return [x]
        axes = list(range(r))
    axes = sorted({axis_of(cx, a, r) for a in axes})
    k = known(cx, x)
    fn = _REDUCE_KNOWN.get(node.op_type)
    if k is not None and fn is not None and k.data.size and (isinstance(x, Known) or
                                                             not k.dtype.is_float):
        data = np.moveaxis(k.data, axes, list(range(r - len(axes), r)))
        rest = data.shape[: r - len(axes)]
        rows = data.reshape(rest + (-1,))
        out = np.empty(rest, dtype=object)
        for i in np.ndindex(rest):
            out[i] = reduce(fn, list(rows[i]))
        if keep:
            out = out.reshape([1 if i in axes else d for i, d in enumerate(k.shape)])
        return [Known(out, k.dtype)]
    if REDUCE[node.op_type] is None:
        raise cx.unsupported(f"{node.op_type} of a tensor (only of shapes) has no IR op")
    v = cx.value(x)
    if r == 0:
        return [v]
    if any(isinstance(v.shape[a], int) and v.shape[a] == 0 for a in axes):
        return [_empty_reduction(cx, node.op_type, v, axes, keep)]
    return [cx.op(REDUCE[node.op_type], v, axes=axes, keepdim=keep)]


def _empty_reduction(cx, op_type: str, v: Value, axes: list[int], keep: bool) -> Value:
    """A reduction over an empty axis: the op's identity (torch refuses max/min of nothing)."""
    shape = [1 if i in axes else d for i, d in enumerate(v.shape)] if keep else \
        [d for i, d in enumerate(v.shape) if i not in axes]
    dt = v.dtype
    if op_type in ("ReduceMax", "ReduceMin"):
        big = math.inf if dt.is_float else (True if dt == DType.bool else
                                            torch.iinfo(dt.torch).max)
        low = -math.inf if dt.is_float else (False if dt == DType.bool else
                                             torch.iinfo(dt.torch).min)
        fill = low if op_type == "ReduceMax" else big
    else:
        fill = {"ReduceSum": 0, "ReduceProd": 1, "ReduceMean": math.nan}[op_type]
    return _full(cx, shape, fill, dt)


@onnx_op("ArgMax", "ArgMin")
def _argmax(cx, node):
    v = cx.value(node.input(0))
    axis = axis_of(cx, node.attr("axis", 0), v.type.rank)
    keep = bool(node.attr("keepdims", 1))
    if node.op_type == "ArgMin":
        v = cx.op("neg", v) if v.dtype != DType.bool else cx.op("logical_not", v)
    if not node.attr("select_last_index", 0):
        return [cx.op("argmax", v, axis=axis, keepdim=keep)]
    n = v.shape[axis]  # the last maximum: argmax of the reversed axis, counted from the end
    if not isinstance(n, int):
        raise cx.unsupported(f"{node.op_type} with select_last_index=1 over a symbolic dim")
    rev = cx.add_weight(torch.arange(n - 1, -1, -1, dtype=torch.int64), "rev")
    idx = cx.op("argmax", cx.op("index_select", v, rev, axis=axis), axis=axis, keepdim=keep)
    return [cx.op("sub", cx.const(n - 1, DType.i64), idx)]


@onnx_op("Softmax", "LogSoftmax")
def _softmax(cx, node):
    v = cx.value(node.input(0))
    axis = axis_of(cx, node.attr("axis", -1), v.type.rank)
    return [cx.op("softmax" if node.op_type == "Softmax" else "log_softmax", v, axis=axis)]


def _norm_params(cx, x: Value, nd: int, params: list) -> tuple[list, bool]:
    """Weight/bias as the norm op takes them (exactly the normalised shape), or False when
    they only broadcast to it (then the caller multiplies/adds them itself)."""
    want = list(x.shape[x.type.rank - nd:])
    ok = all(p is None or (p.type.rank == nd and all(dims_equal(a, b) for a, b in
                                                      zip(p.shape, want))) for p in params)
    return params, ok


@onnx_op("LayerNormalization")
def _layer_norm(cx, node):
    x = cx.value(node.input(0))
    axis = axis_of(cx, node.attr("axis", -1), x.type.rank)
    nd = x.type.rank - axis
    w = cx.value(node.input(1)) if node.has_input(1) else None
    b = cx.value(node.input(2)) if node.has_input(2) else None
    eps = float(node.attr("epsilon", 1e-5))
    _, exact = _norm_params(cx, x, nd, [w, b])
    if exact:
        y = cx.op("layer_norm", x, w, b, eps=eps, normalized_ndim=nd)
    else:
        y = cx.op("layer_norm", x, None, None, eps=eps, normalized_ndim=nd)
        if w is not None:
            y = cx.op("mul", y, w)
        if b is not None:
            y = cx.op("add", y, b)
    if not (node.used(1) or node.used(2)):
        return [y, None, None]
    # Mean and InvStdDev (training outputs) in the stash type, over the normalised axes
    stash = dtype_of(node.attr("stash_type", 1), f"the stash_type of {cx.where()}")
    xs = cast(cx, x, stash)
    axes = list(range(axis, x.type.rank))
    mean = cx.op("reduce_mean", xs, axes=axes, keepdim=True)
    diff = cx.op("sub", xs, mean)
    var = cx.op("reduce_mean", cx.op("mul", diff, diff), axes=axes, keepdim=True)
    inv = cx.op("rsqrt", cx.op("add", var, cx.const(eps, stash)))
    return [y, mean, inv]


@onnx_op("SimplifiedLayerNormalization")
@onnx_op("SimplifiedLayerNormalization", domain=MS)
def _simplified_layer_norm(cx, node):
    x = cx.value(node.input(0))
    axis = axis_of(cx, node.attr("axis", -1), x.type.rank)
    nd = x.type.rank - axis
    w = cx.value(node.input(1)) if node.has_input(1) else None
    eps = float(node.attr("epsilon", 1e-5))
    upcast = node.attr("stash_type", 1) == 1
    _, exact = _norm_params(cx, x, nd, [w])
    if exact:
        return [cx.op("rms_norm", x, w, eps=eps, normalized_ndim=nd, upcast=upcast), None]
    y = cx.op("rms_norm", x, None, eps=eps, normalized_ndim=nd, upcast=upcast)
    return [y if w is None else cx.op("mul", y, w), None]


@onnx_op("SkipLayerNormalization", "SkipSimplifiedLayerNormalization", domain=MS)
def _skip_layer_norm(cx, node):
    """input + skip (+ bias) -> norm; outputs (normed, mean, inv_std, sum)."""
    simplified = node.op_type == "SkipSimplifiedLayerNormalization"
    x, skip = cx.value(node.input(0)), cx.value(node.input(1))
    gamma = cx.value(node.input(2)) if node.has_input(2) else None
    beta = None if simplified or not node.has_input(3) else cx.value(node.input(3))
    bias_i = 3 if simplified else 4
    if node.has_input(bias_i):
        x = cx.op("add", x, cx.value(node.input(bias_i)))
    eps = float(node.attr("epsilon", 1e-12 if not simplified else 1e-6))
    if simplified:
        normed, total = cx.emit("add_norm", [x, skip, gamma], {"kind": "rms", "eps": eps,
                                                               "upcast": True})
    else:
        normed, total = cx.emit("add_norm", [x, skip, gamma, beta], {"kind": "layer",
                                                                     "eps": eps})
    return [normed, None, None, total] if not simplified else [normed, None, None, total]


# -- activations ----------------------------------------------------------------------------


@onnx_op("Gelu")
def _gelu(cx, node):
    approx = node.attr("approximate", "none")
    if approx not in ("none", "tanh"):
        raise cx.fail(f"approximate must be 'none' or 'tanh', got {approx!r}")
    return [cx.op("gelu", cx.value(node.input(0)), approximate=approx)]


@onnx_op("Gelu", domain=MS)
def _ms_gelu(cx, node):
    return [cx.op("gelu", cx.value(node.input(0)))]


@onnx_op("FastGelu", domain=MS)
def _fast_gelu(cx, node):
    x = cx.value(node.input(0))
    if node.has_input(1):
        x = cx.op("add", x, cx.value(node.input(1)))
    return [cx.op("gelu", x, approximate="tanh")]


@onnx_op("BiasGelu", domain=MS)
def _bias_gelu(cx, node):
    return [cx.op("gelu", cx.op("add", cx.value(node.input(0)), cx.value(node.input(1))))]


@onnx_op("QuickGelu", domain=MS)
def _quick_gelu(cx, node):
    x = cx.value(node.input(0))
    alpha = float(node.attr("alpha", 1.702))
    return [cx.op("mul", x, cx.op("sigmoid", cx.op("mul", x, cx.const(alpha, x.dtype))))]


@onnx_op("Clip")
def _clip(cx, node):
    v = cx.value(node.input(0))
    lo = known(cx, node.input(1)) if node.has_input(1) else None
    hi = known(cx, node.input(2)) if node.has_input(2) else None
    scalars = [k.elements()[0] if k is not None and k.is_concrete and k.data.size == 1 else None
               for k in (lo, hi)]
    given = [node.has_input(1), node.has_input(2)]
    if v.dtype.is_float and all(s is not None or not g for s, g in zip(scalars, given)):
        if not any(given):
            return [v]
        return [cx.op("clamp", v, min=scalars[0], max=scalars[1])]
    if given[0]:
        v = cx.op("maximum", v, cx.value(node.input(1)))
    if given[1]:
        v = cx.op("minimum", v, cx.value(node.input(2)))
    return [v]


# -- attention and rotary (ORT contrib ops, ONNX 23 RotaryEmbedding) --------------------------


@onnx_op("MultiHeadAttention", domain=MS)
def _multi_head_attention(cx, node):
    """ORT's MultiHeadAttention without past/present and packing: q [B, S, H·D]; k, v
    [B, T, H·D] or [B, H, T, D]; key_padding_mask [B, T] (1 = attend) and attention_bias
    [B|1, H|1, S, T] become the additive bias; ``unidirectional`` is ``causal``."""
    if any(node.has_input(i) for i in (6, 7, 8, 9)) or node.used(1) or node.used(2):
        raise cx.unsupported("MultiHeadAttention with past/present key and value (KV cache)")
    if not (node.has_input(1) and node.has_input(2)):
        raise cx.unsupported("MultiHeadAttention with packed QKV / KV")
    heads = node.attr("num_heads")
    q = cx.value(node.input(0))
    k, v = cx.value(node.input(1)), cx.value(node.input(2))
    if q.type.rank != 3 or k.type.rank not in (3, 4) or v.type.rank != k.type.rank:
        raise cx.unsupported(f"MultiHeadAttention with q {q.type}, k {k.type}, v {v.type}")
    hd = q.shape[2]
    if node.has_input(3):
        if k.type.rank != 3:
            raise cx.unsupported("MultiHeadAttention bias with 4-D key/value")
        sizes = [hd, k.shape[2], v.shape[2]]
        bq, bk, bv = cx.emit("split", [cx.value(node.input(3))], {"axis": 0, "sizes": sizes})
        q, k, v = cx.op("add", q, bq), cx.op("add", k, bk), cx.op("add", v, bv)
    t = k.shape[1] if k.type.rank == 3 else k.shape[2]
    bias = None
    if node.has_input(4):
        m = cx.value(node.input(4))
        if m.type.rank != 2:
            raise cx.unsupported(f"MultiHeadAttention key_padding_mask of type {m.type} "
                                 "(only [B, T] is supported)")
        fill = float(node.attr("mask_filter_value", -10000.0))
        keep = cx.op("ne", m, cx.const(0, m.dtype))
        bias = cx.op("where", keep, cx.const(0.0, q.dtype), cx.const(fill, q.dtype))
        bias = to_shape(cx, bias, [m.shape[0], 1, 1, t])
    if node.has_input(5):
        ab = cx.value(node.input(5))
        bias = ab if bias is None else cx.op("add", bias, ab)
    out = _heads_attention(cx, q, k, v, heads, bias, node.attr("scale"),
                           bool(node.attr("unidirectional", 0)))
    return [out, None, None]


@onnx_op("Attention", domain=MS)
def _ms_attention(cx, node):
    """ORT's packed Attention without past: x [B, S, E] @ weights [E, Nq+Nk+Nv] + bias, split
    into q, k, v; ``mask_index`` [B] (key lengths, right padding) or [B, T] (1 = attend)
    becomes the additive bias (``mask_filter_value``); ``unidirectional`` is ``causal``."""
    if any(node.has_input(i) for i in (4, 6)) or node.used(1):
        raise cx.unsupported("Attention with past/present key and value (KV cache)")
    if node.attr("do_rotary", 0) or node.attr("past_present_share_buffer", 0):
        raise cx.unsupported("Attention with do_rotary / past_present_share_buffer")
    heads = node.attr("num_heads")
    x, w = cx.value(node.input(0)), cx.value(node.input(1))
    if x.type.rank != 3 or w.type.rank != 2:
        raise cx.unsupported(f"Attention with input {x.type} and weights {w.type}")
    total = w.shape[1]
    sizes = list(node.attr("qkv_hidden_sizes") or [total // 3] * 3)
    bias = cx.value(node.input(2)) if node.has_input(2) else None
    proj = cx.op("linear", x, _weight_t(cx, w), bias) if w.is_const else \
        cx.op("matmul", x, w) if bias is None else cx.op("add", cx.op("matmul", x, w), bias)
    q, k, v = cx.emit("split", [proj], {"axis": 2, "sizes": sizes})
    b, s = x.shape[0], x.shape[1]
    mask = None
    if node.has_input(3):
        m = cx.value(node.input(3))
        fill = float(node.attr("mask_filter_value", -10000.0))
        if m.type.rank == 1:  # key lengths
            pos = cx.op("arange", start=0, end=s, step=1, dtype=m.dtype)
            keep = cx.op("lt", to_shape(cx, pos, [1, s]), to_shape(cx, m, [m.shape[0], 1]))
        elif m.type.rank == 2:
            keep = cx.op("ne", m, cx.const(0, m.dtype))
        else:
            raise cx.unsupported(f"Attention mask_index of type {m.type} (only [B] or [B, T])")
        mask = to_shape(cx, cx.op("where", keep, cx.const(0.0, x.dtype),
                                  cx.const(fill, x.dtype)), [b, 1, 1, keep.shape[-1]])
    if node.has_input(5):
        ab = cx.value(node.input(5))
        mask = ab if mask is None else cx.op("add", mask, ab)
    out = _heads_attention(cx, q, k, v, heads, mask, node.attr("scale"),
                           bool(node.attr("unidirectional", 0)))
    return [out, None]


def _heads_attention(cx, q: Value, k: Value, v: Value, heads: int, bias: Value | None,
                     scale: float | None, causal: bool) -> Value:
    """q [B, S, H·D], k/v [B, T, H·D] or [B, H, T, D] -> attention -> [B, S, H·Dv]."""
    b, s, hd = q.shape
    if not isinstance(hd, int) or not heads or hd % heads:
        raise cx.fail(f"hidden size {hd} is not a static multiple of num_heads={heads}")

    def heads_first(x: Value) -> Value:  # [B, L, H·D] -> [B, H, L, D]
        if x.type.rank == 4:
            return x
        y = to_shape(cx, x, [x.shape[0], x.shape[1], heads, x.shape[2] // heads])
        return cx.op("permute", y, perm=[0, 2, 1, 3])

    q4, k4, v4 = heads_first(q), heads_first(k), heads_first(v)
    out = cx.op("attention", q4, k4, v4, bias, scale=None if not scale else float(scale),
                causal=causal)
    out = cx.op("permute", out, perm=[0, 2, 1, 3])
    return to_shape(cx, out, [b, s, heads * v4.shape[3]])


@onnx_op("EmbedLayerNormalization", domain=MS)
def _embed_layer_norm(cx, node):
    """word + position (+ segment) embeddings -> layer_norm; mask_index = the mask's row sums."""
    ids = cx.value(node.input(0))
    b, s = ids.shape
    word, posw = cx.value(node.input(2)), cx.value(node.input(3))
    h = cx.op("embedding", word, ids)
    if node.has_input(8):
        pos = cx.value(node.input(8))
    else:
        pos = to_shape(cx, cx.op("arange", start=0, end=s, step=1, dtype=DType.i64), [1, s])
    h = cx.op("add", h, cx.op("embedding", posw, pos))
    if node.has_input(1) and node.has_input(4):
        h = cx.op("add", h, cx.op("embedding", cx.value(node.input(4)),
                                  cx.value(node.input(1))))
    total = h
    gamma = cx.value(node.input(5))
    beta = cx.value(node.input(6)) if node.has_input(6) else None
    y = cx.op("layer_norm", h, gamma, beta, eps=float(node.attr("epsilon", 1e-12)))
    mask_index = None
    if node.used(1):
        if not node.has_input(7):
            raise cx.unsupported("EmbedLayerNormalization mask_index without a mask input")
        m = cx.value(node.input(7))
        mask_index = cast(cx, cx.op("reduce_sum", cast(cx, m, DType.i64), axes=[1]), DType.i32)
    return [y, mask_index, total]


def _full_width(cx, half: Value, interleaved: bool) -> Value:
    """cos/sin [.., R/2] -> [.., R]: halves repeated (rotate-half) or each element twice."""
    if not interleaved:
        return cx.emit("concat", [half, half], {"axis": half.type.rank - 1})
    lead, r2 = list(half.shape[:-1]), half.shape[-1]
    pair = cx.op("expand", to_shape(cx, half, lead + [r2, 1]), shape=lead + [r2, 2])
    return to_shape(cx, pair, lead + [2 * r2])


def _rotary(cx, node, x: Value, cos: Value, sin: Value, pos: Value | None, heads: int,
            rot_dim: int, interleaved: bool) -> Value:
    if pos is not None:
        if pos.type.rank != 2:
            raise cx.unsupported(f"RotaryEmbedding with position_ids {pos.type} (only [B, S])")
        cos, sin = (cx.op("embedding", c, pos) if c.type.rank == 2 else
                    cx.fail("cos/sin caches must be 2-D with position_ids") for c in (cos, sin))
    if cos.type.rank != 3:
        raise cx.unsupported(f"RotaryEmbedding cos cache {cos.type} (expected [B, S, R/2])")
    r = x.type.rank
    if r == 3:
        hd = x.shape[2]
        if not heads:
            heads = hd // (2 * cos.shape[-1]) if isinstance(hd, int) else 0
        if not heads or not isinstance(hd, int) or hd % heads:
            raise cx.fail(f"cannot split hidden size {hd} into num_heads={heads}")
        xs = to_shape(cx, x, [x.shape[0], x.shape[1], heads, hd // heads])  # [B, S, H, D]
        unsq = [cos.shape[0], cos.shape[1], 1]
    elif r == 4:
        xs, unsq = x, [cos.shape[0], 1, cos.shape[1]]  # [B, H, S, D]
    else:
        raise cx.unsupported(f"RotaryEmbedding of {x.type}")
    head = xs.shape[3]
    rot = rot_dim or head
    if not isinstance(head, int) or rot % 2 or rot > head or 2 * cos.shape[-1] != rot:
        raise cx.fail(f"rotary dim {rot} does not match head size {head} / cos cache {cos.type}")
    c, sn = (to_shape(cx, _full_width(cx, t, interleaved), unsq + [rot]) for t in (cos, sin))
    part = xs if rot == head else cx.op("slice", xs, axis=3, start=0, end=rot, step=1)
    y = cx.op("rotary", part, c, sn, interleaved=interleaved)
    if rot != head:
        rest = cx.op("slice", xs, axis=3, start=rot, end=head, step=1)
        y = cx.emit("concat", [y, rest], {"axis": 3})
    return to_shape(cx, y, list(x.shape))


@onnx_op("RotaryEmbedding", domain=MS)
def _ms_rotary(cx, node):
    if node.attr("is_packed_batching", 0) or float(node.attr("scale", 1.0)) != 1.0:
        raise cx.unsupported("RotaryEmbedding with packed batching or scale != 1")
    x, pos = cx.value(node.input(0)), cx.value(node.input(1))
    cos, sin = cx.value(node.input(2)), cx.value(node.input(3))
    return [_rotary(cx, node, x, cos, sin, pos, node.attr("num_heads", 0),
                    node.attr("rotary_embedding_dim", 0), bool(node.attr("interleaved", 0)))]


@onnx_op("RotaryEmbedding")
def _rotary_embedding(cx, node):
    x, cos, sin = (cx.value(node.input(i)) for i in range(3))
    pos = cx.value(node.input(3)) if node.has_input(3) else None
    return [_rotary(cx, node, x, cos, sin, pos, node.attr("num_heads", 0),
                    node.attr("rotary_embedding_dim", 0), bool(node.attr("interleaved", 0)))]


# -- matrix products ------------------------------------------------------------------------


def _weight_t(cx, w: Value) -> Value:
    """A 2-D constant [K, N] as the [N, K] weight ``linear`` takes, made once per constant."""
    key = ("weight_t", id(w))
    if key not in cx.cache:
        cx.cache[key] = cx.add_weight(w.const.t().contiguous(), f"{w.name}_t")
    return cx.cache[key]


@onnx_op("MatMul")
def _matmul(cx, node):
    a, b = cx.value(node.input(0)), cx.value(node.input(1))
    if b.type.rank == 2 and a.type.rank >= 1 and a.dtype == b.dtype:
        p = b.producer
        if b.is_const:
            return [cx.op("linear", a, _weight_t(cx, b), None)]
        if p is not None and p.op == "permute" and p.inputs[0].is_const:  # x @ W.T
            return [cx.op("linear", a, p.inputs[0], None)]
    return [cx.op("matmul", a, b)]


@onnx_op("Gemm")
def _gemm(cx, node):
    a, b = cx.value(node.input(0)), cx.value(node.input(1))
    if a.type.rank != 2 or b.type.rank != 2:
        raise cx.fail(f"Gemm takes 2-D A and B, got {a.type} and {b.type}")
    alpha, beta = float(node.attr("alpha", 1.0)), float(node.attr("beta", 1.0))
    if node.attr("transA", 0):
        a = cx.op("permute", a, perm=[1, 0])
    c = cx.value(node.input(2)) if node.has_input(2) else None
    n = b.shape[0] if node.attr("transB", 0) else b.shape[1]
    bias = None
    if c is not None and beta == 1.0 and alpha == 1.0 and c.type.rank <= 2 and \
            c.type.rank >= 1 and dims_equal(c.shape[-1], n) and (c.type.rank == 1 or
                                                                 c.shape[0] == 1):
        bias, c = to_shape(cx, c, [n]), None
    if b.is_const:
        w = b if node.attr("transB", 0) else _weight_t(cx, b)
        y = cx.op("linear", a, w, bias)
    else:
        bt = cx.op("permute", b, perm=[1, 0]) if node.attr("transB", 0) else b
        y = cx.op("matmul", a, bt)
        if bias is not None:
            y = cx.op("add", y, bias)
    if alpha != 1.0:
        y = cx.op("mul", y, cx.const(alpha, y.dtype))
    if c is not None and beta != 0.0:
        if beta != 1.0:
            c = cx.op("mul", c, cx.const(beta, c.dtype))
        y = cx.op("add", y, c)
    return [y]


@onnx_op("Einsum")
def _einsum(cx, node):
    """Einsum of one operand (sums, transposes) or two (batched matmul: batch letters, free
    letters of each side and contracted letters -> permute, reshape, matmul, reshape,
    permute). Repeated letters in one operand (diagonals) and three or more operands are
    unsupported."""
    eq = str(node.attr("equation", "")).replace(" ", "")
    vals = [cx.value(node.input(i)) for i in range(len(node.inputs)) if node.has_input(i)]
    terms, out = _einsum_terms(cx, eq, vals)
    size: dict[str, Any] = {}
    for term, v in zip(terms, vals):
        for c, d in zip(term, v.shape):
            if c in size and not dims_equal(size[c], d):
                raise cx.unsupported(f"Einsum {eq!r}: letter {c!r} has sizes {size[c]} and {d} "
                                     "(broadcasting between operands is not supported)")
            size.setdefault(c, d)
    # letters only one operand has and the output lacks are summed out first
    reduced = []
    for i, (term, v) in enumerate(zip(terms, vals)):
        others = "".join(t for j, t in enumerate(terms) if j != i) + out
        axes = [k for k, c in enumerate(term) if c not in others]
        if axes:
            v = cx.op("reduce_sum", v, axes=axes, keepdim=False)
            term = "".join(c for k, c in enumerate(term) if k not in axes)
        reduced.append((term, v))
    if len(reduced) == 1:
        term, v = reduced[0]
        return [_permute_to(cx, v, term, out)]
    (ta, a), (tb, b) = reduced
    batch = [c for c in out if c in ta and c in tb]
    contract = [c for c in ta if c in tb and c not in out]
    afree = [c for c in ta if c not in tb]
    bfree = [c for c in tb if c not in ta]
    a2 = _permute_to(cx, a, ta, "".join(batch + afree + contract))
    b2 = _permute_to(cx, b, tb, "".join(batch + contract + bfree))
    bdims = [size[c] for c in batch]
    m = dim_product([size[c] for c in afree])
    k = dim_product([size[c] for c in contract])
    n = dim_product([size[c] for c in bfree])
    y = cx.op("matmul", to_shape(cx, a2, bdims + [m, k]), to_shape(cx, b2, bdims + [k, n]))
    y = to_shape(cx, y, bdims + [size[c] for c in afree + bfree])
    return [_permute_to(cx, y, "".join(batch + afree + bfree), out)]


def _einsum_terms(cx, eq: str, vals: list[Value]) -> tuple[list[str], str]:
    lhs, arrow, out = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(vals):
        raise cx.fail(f"Einsum {eq!r} names {len(terms)} operands, got {len(vals)}")
    if len(vals) > 2:
        raise cx.unsupported(f"Einsum {eq!r}: {len(vals)} operands (transfuse lowers one or two)")
    spare = iter(c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in eq)
    ell: list[str] | None = None
    expanded = []
    for term, v in zip(terms, vals):
        if "..." in term:
            n = v.type.rank - (len(term) - 3)
            if ell is None:
                ell = [next(spare) for _ in range(max(n, 0))]
            if n != len(ell):
                raise cx.unsupported(f"Einsum {eq!r}: ellipses of different ranks")
            term = term.replace("...", "".join(ell))
        if len(term) != v.type.rank or not term.isalpha():
            raise cx.fail(f"Einsum {eq!r}: term {term!r} does not match an operand of rank "
                          f"{v.type.rank}")
        if len(set(term)) != len(term):
            raise cx.unsupported(f"Einsum {eq!r}: a letter repeats within one operand "
                                 "(diagonals are not supported)")
        expanded.append(term)
    if arrow:
        out = out.replace("...", "".join(ell or []))
    else:
        counts = {c: sum(t.count(c) for t in expanded) for c in "".join(expanded)}
        out = "".join(ell or []) + "".join(sorted(c for c, n in counts.items()
                                                  if n == 1 and c not in (ell or [])))
    if len(set(out)) != len(out) or any(c not in "".join(expanded) for c in out):
        raise cx.fail(f"Einsum {eq!r}: bad output letters {out!r}")
    return expanded, out


def _permute_to(cx, v: Value, have: str, want: str) -> Value:
    perm = [have.index(c) for c in want]
    return v if perm == list(range(len(perm))) else cx.op("permute", v, perm=perm)


__all__ = ["TABLE", "KNOWN_MAX", "Known", "Missing", "OnnxNode", "onnx_op", "lookup",
           "supported_ops", "known", "materialize", "node_label", "ONNX_TO_DTYPE"]
