"""What a generated kernel computes per IR op: Triton expressions of the pointwise ops, the
row reductions, the views and the constants folded into literals.

Glossary: a *literal* is an IR value known to hold one number everywhere (a constant with one
element, ``full``, or a pointwise op of literals, folded with the op's reference
implementation); it is written into the kernel source, never loaded. *Compute types*: every
float value is held in fp32 (f64 in f64), integers in their own type, bools as ``tl.int1``;
loads upcast, stores cast to the output dtype, and a value whose IR dtype is f16/bf16 is
rounded to it after the op that makes it (``.to(tl.float16).to(tl.float32)``), as torch
rounds each op's result: the kernels give the python target's numbers, not better ones.

:data:`POINTWISE` is a :class:`~transfuse.codegen.lowering.Lowerings` registry (the one
registry class of codegen) of pointwise emitters: ``fn(ctx, node) -> str``, a Triton
expression of the node's output in its compute type, built from ``ctx.arg(i)`` (operand
``i`` converted to the compute type the op works in) and ``ctx.literal(i)``; ``supports``
says why an op cannot be generated (integer ``pow``, fp8 values...). :data:`REDUCTIONS`
and :data:`ROW_OPS` (``softmax``, ``log_softmax``, ``rms_norm``, ``layer_norm``,
``add_norm``) reduce over the last dim and live in row kernels. :data:`VIEWS` (``reshape``,
``expand``) fuse only where the partitioner finds them contiguous-compatible.

Functions the interpreter lacks (libdevice ``tanh``, ``pow``) are written as small
``@triton.jit`` helpers (:data:`HELPERS`) emitted into the kernel module when used.
``tl.math.erf`` runs in the interpreter (triton 3.9) and on GPUs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from transfuse.codegen.lowering import Lowerings
from transfuse.ir.graph import Node, Value
from transfuse.ir.ops import get_op
from transfuse.ir.types import DType

#: every pointwise op a generated kernel computes, by IR op
POINTWISE = Lowerings("triton-gen")

#: the Triton type each IR dtype is computed in (fp8 and quantized values are not generated)
COMPUTE = {
    DType.f16: "tl.float32", DType.bf16: "tl.float32", DType.f32: "tl.float32",
    DType.f64: "tl.float64", DType.i64: "tl.int64", DType.i32: "tl.int32",
    DType.i16: "tl.int16", DType.i8: "tl.int8", DType.u8: "tl.uint8", DType.bool: "tl.int1",
}
#: the Triton element type of a pointer to each IR dtype
POINTER = {
    DType.f16: "tl.float16", DType.bf16: "tl.bfloat16", DType.f32: "tl.float32",
    DType.f64: "tl.float64", DType.i64: "tl.int64", DType.i32: "tl.int32",
    DType.i16: "tl.int16", DType.i8: "tl.int8", DType.u8: "tl.uint8", DType.bool: "tl.int1",
}
#: dtypes rounded to after each op (their values are held in fp32)
ROUNDED = {DType.f16: "tl.float16", DType.bf16: "tl.bfloat16"}
FLOATS = (DType.f16, DType.bf16, DType.f32, DType.f64)

#: reductions over the last dim: op -> (combine, identity)
REDUCTIONS = {"reduce_sum": ("sum", 0.0), "reduce_mean": ("sum", 0.0),
              "reduce_max": ("max", -math.inf), "reduce_min": ("min", math.inf)}
#: ops that reduce a row internally and give a row back (norms over the last dim only)
ROW_OPS = ("softmax", "log_softmax", "rms_norm", "layer_norm", "add_norm")
#: views that may sit inside a group
VIEWS = ("reshape", "expand")
#: data movement that changes the element order: never inside a group
REORDERING_VIEWS = ("permute", "slice", "concat", "split")


class ExprContext:
    """What an emitter reads the node's operands through (implemented by the emitter)."""

    def arg(self, i: int, dtype: DType | None = None) -> str:
        """Operand ``i`` as an expression in the compute type of ``dtype`` (default: the
        node's output dtype); literals come out as Python literals of that type."""
        raise NotImplementedError

    def literal(self, i: int) -> float | int | bool | None:
        """The number operand ``i`` holds everywhere, or None when it is a tensor."""
        raise NotImplementedError

    def helper(self, name: str) -> str:
        """``name`` of a jit helper of :data:`HELPERS`, emitted into the module."""
        raise NotImplementedError


# -- literals ------------------------------------------------------------------------------


def dtype_problem(v: Value) -> str | None:
    """Why a value's type cannot live in a generated kernel (None when it can)."""
    t = v.type
    if t.quant is not None:
        return f"%{v.name} is a quantized weight ({t})"
    if t.dtype not in COMPUTE:
        return f"%{v.name} has dtype {t.dtype}, which generated kernels do not compute in"
    return None


def literal_value(v: Value, memo: dict[int, Any] | None = None) -> float | int | bool | None:
    """The number ``v`` holds everywhere, or None: a one-element constant, ``full``, or a
    pointwise op whose operands are all literals (folded with its reference implementation
    on 0-d tensors, so the value is rounded as the IR computes it)."""
    memo = {} if memo is None else memo
    key = id(v)
    if key in memo:
        return memo[key]
    memo[key] = None  # a cycle guard; SSA graphs have none
    out = _literal(v, memo)
    memo[key] = out
    return out


def _literal(v: Value, memo: dict[int, Any]) -> float | int | bool | None:
    if dtype_problem(v) is not None:
        return None
    if v.const is not None:
        return v.const.reshape(()).item() if v.const.numel() == 1 else None
    node = v.producer
    if node is None or len(node.outputs) != 1:
        return None
    if node.op == "full":
        return torch.tensor(node.attrs["value"]).to(v.dtype.torch).item()
    if node.op not in POINTWISE or not node.inputs or POINTWISE.supports(node) is not None:
        return None
    values = [None if x is None else literal_value(x, memo) for x in node.inputs]
    if any(x is None for x in values):
        return None
    args = [torch.tensor(x, dtype=i.dtype.torch) for x, i in zip(values, node.inputs)]
    out = get_op(node.op).impl(args, node.attrs, {})
    if not isinstance(out, torch.Tensor) or out.numel() != 1:
        return None
    return out.to(v.dtype.torch).reshape(()).item()


def format_literal(value: float | int | bool, dtype: DType) -> str:
    """``value`` as Triton source in ``dtype``'s compute type."""
    if dtype == DType.bool:
        return "True" if bool(value) else "False"
    if dtype.is_float:
        x = float(value)
        if math.isnan(x):
            return 'float("nan")'
        if math.isinf(x):
            return 'float("inf")' if x > 0 else '(-float("inf"))'
        text = repr(x)
        return f"({text})" if x < 0 else text
    n = int(value)
    return f"({n})" if n < 0 else str(n)


# -- helpers emitted into kernel modules ------------------------------------------------------

#: name -> source of a ``@triton.jit`` helper (fp32 or f64 arguments)
HELPERS = {
    "_tanh": '''
@triton.jit
def _tanh(x):
    """tanh without libdevice: a series near 0 (no cancellation), else from exp(-2|x|)."""
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    x2 = x * x
    small = a * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333
                 + x2 * (-0.05396825396825397 + x2 * 0.021869488536155203))))
    t = tl.where(a < 0.25, small, big)
    return tl.where(x < 0, -t, t)
''',
    "_pow": '''
@triton.jit
def _pow(a, b):
    """a ** b as torch.pow (floats): exp2(b log2|a|), signed for odd integer b, NaN for a
    negative base and a fractional b, 1 for b == 0."""
    mag = tl.exp2(b * tl.log2(tl.abs(a)))
    b_int = tl.floor(b) == b
    half = b * 0.5
    odd = b_int & (tl.floor(half) != half)
    neg = tl.where(odd, -mag, mag)
    out = tl.where(a < 0, tl.where(b_int, neg, float("nan")), mag)
    return tl.where(b == 0, 1.0, out)
''',
    "_floor_div_int": '''
@triton.jit
def _floor_div_int(a, b):
    """Python's a // b on integers (Triton's // truncates toward zero)."""
    q = a // b
    r = a - q * b
    return tl.where((r != 0) & ((r < 0) != (b < 0)), q - 1, q)
''',
    "_remainder_int": '''
@triton.jit
def _remainder_int(a, b):
    """Python's a % b on integers (the sign of b; Triton's % takes the sign of a)."""
    r = a % b
    return tl.where((r != 0) & ((r < 0) != (b < 0)), r + b, r)
''',
}


# -- the pointwise emitters -----------------------------------------------------------------


def _in(node: Node, i: int) -> DType:
    return node.inputs[i].dtype


def _out(node: Node) -> DType:
    return node.outputs[0].dtype


def _float_out(node: Node) -> str | None:
    if not _out(node).is_float:
        return f"op '{node.op}' on {_out(node)} values is not generated (floats only)"
    return None


def _not_bool(node: Node) -> str | None:
    if _out(node) == DType.bool:
        return f"op '{node.op}' on bool values is not generated"
    return None


def _fdiv(a: str, b: str) -> str:
    """a / b (Triton's fp32 division may be 2 ulp off IEEE on a GPU; ``tl.div_rn`` does not
    broadcast its operands, which differ in shape here: [ROWS, 1] row values, scalars)."""
    return f"({a} / {b})"


_INFIX = {"add": "+", "sub": "-", "mul": "*"}
_COMPARE = {"eq": "==", "ne": "!=", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}


def _infix(symbol: str) -> Callable[[ExprContext, Node], str]:
    return lambda ctx, node: f"({ctx.arg(0)} {symbol} {ctx.arg(1)})"


for _op, _sym in _INFIX.items():
    POINTWISE.register(_op, supports=_not_bool)(_infix(_sym))


def _compare(symbol: str) -> Callable[[ExprContext, Node], str]:
    def fn(ctx: ExprContext, node: Node) -> str:
        from transfuse.ir.types import promote

        t = promote(_in(node, 0), _in(node, 1))
        return f"({ctx.arg(0, t)} {symbol} {ctx.arg(1, t)})"

    return fn


for _op, _sym in _COMPARE.items():
    POINTWISE.register(_op)(_compare(_sym))


def _as_bool(ctx: ExprContext, i: int, node: Node) -> str:
    return ctx.arg(i, DType.bool)


for _op, _sym in {"logical_and": "&", "logical_or": "|", "logical_xor": "^"}.items():
    POINTWISE.register(_op)(
        lambda ctx, node, s=_sym: f"({_as_bool(ctx, 0, node)} {s} {_as_bool(ctx, 1, node)})")


@POINTWISE.register("logical_not")
def _logical_not(ctx, node):
    return f"({ctx.arg(0, DType.bool)} == 0)"


@POINTWISE.register("div", supports=_float_out)
def _div(ctx, node):
    return _fdiv(ctx.arg(0), ctx.arg(1))


@POINTWISE.register("pow", supports=_float_out)
def _pow(ctx, node):
    a, e = ctx.arg(0), ctx.literal(1)
    if e is not None:
        e = float(e)
        if e == 0:
            return f"tl.where({a} == {a}, 1.0, 1.0)"  # 1 for NaN too, as torch
        if e == 1:
            return a
        if e in (2.0, 3.0, 4.0):
            return "(" + " * ".join([a] * int(e)) + ")"
        if e == 0.5:
            return f"tl.sqrt_rn({a})" if COMPUTE[_out(node)] == "tl.float32" else f"tl.sqrt({a})"
        if e == -1:
            return _fdiv("1.0", a)
        if math.isfinite(e):  # the helper's branches decided here: b is known
            mag = f"tl.exp2({format_literal(e, DType.f32)} * tl.log2(tl.abs({a})))"
            if e != math.floor(e):
                return f'tl.where({a} < 0, float("nan"), {mag})'
            if int(e) % 2:
                return f"tl.where({a} < 0, -{mag}, {mag})"
            return mag
    return f"{ctx.helper('_pow')}({a}, {ctx.arg(1)})"


def _minmax(fn: str) -> Callable[[ExprContext, Node], str]:
    def emit(ctx: ExprContext, node: Node) -> str:
        if _out(node).is_float:  # torch propagates NaN
            return f"{fn}({ctx.arg(0)}, {ctx.arg(1)}, propagate_nan=tl.PropagateNan.ALL)"
        return f"{fn}({ctx.arg(0)}, {ctx.arg(1)})"

    return emit


POINTWISE.register("maximum", supports=_not_bool)(_minmax("tl.maximum"))
POINTWISE.register("minimum", supports=_not_bool)(_minmax("tl.minimum"))


@POINTWISE.register("floor_div", supports=_not_bool)
def _floor_div(ctx, node):
    if _out(node).is_float:
        return f"tl.floor({_fdiv(ctx.arg(0), ctx.arg(1))})"
    return f"{ctx.helper('_floor_div_int')}({ctx.arg(0)}, {ctx.arg(1)})"


@POINTWISE.register("remainder", supports=_not_bool)
def _remainder(ctx, node):
    a, b = ctx.arg(0), ctx.arg(1)
    if _out(node).is_float:
        return f"({a} - {b} * tl.floor({_fdiv(a, b)}))"
    return f"{ctx.helper('_remainder_int')}({a}, {b})"


_UNARY_FLOAT = {
    "exp": "tl.exp({x})", "log": "tl.log({x})", "rsqrt": "tl.rsqrt({x})",
    "erf": "tl.math.erf({x})", "sigmoid": "tl.sigmoid({x})", "sin": "tl.sin({x})",
    "cos": "tl.cos({x})", "silu": "({x} * tl.sigmoid({x}))",
}
for _op, _tpl in _UNARY_FLOAT.items():
    POINTWISE.register(_op)(lambda ctx, node, t=_tpl: t.format(x=ctx.arg(0)))


@POINTWISE.register("sqrt")
def _sqrt(ctx, node):
    x = ctx.arg(0)
    return f"tl.sqrt_rn({x})" if COMPUTE[_out(node)] == "tl.float32" else f"tl.sqrt({x})"


@POINTWISE.register("reciprocal")
def _reciprocal(ctx, node):
    return _fdiv("1.0", ctx.arg(0))


@POINTWISE.register("tanh")
def _tanh(ctx, node):
    return f"{ctx.helper('_tanh')}({ctx.arg(0)})"


@POINTWISE.register("gelu")
def _gelu(ctx, node):
    x = ctx.arg(0)
    if node.attrs["approximate"] == "none":
        return f"(0.5 * {x} * (1.0 + tl.math.erf({x} * 0.7071067811865476)))"
    # 0.5 x (1 + tanh u) = x sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3)
    return f"({x} * tl.sigmoid(1.5957691216057308 * ({x} + 0.044715 * {x} * {x} * {x})))"


@POINTWISE.register("neg", supports=_not_bool)
def _neg(ctx, node):
    return f"(-{ctx.arg(0)})"


@POINTWISE.register("abs", supports=_not_bool)
def _abs(ctx, node):
    return f"tl.abs({ctx.arg(0)})"


@POINTWISE.register("relu", supports=_not_bool)
def _relu(ctx, node):
    x = ctx.arg(0)
    return f"tl.where({x} < 0, 0, {x})"  # NaN stays NaN, as torch.relu


def _floor_ceil(fn: str) -> Callable[[ExprContext, Node], str]:
    return lambda ctx, node: f"{fn}({ctx.arg(0)})" if _out(node).is_float else ctx.arg(0)


POINTWISE.register("floor", supports=_not_bool)(_floor_ceil("tl.floor"))
POINTWISE.register("ceil", supports=_not_bool)(_floor_ceil("tl.ceil"))


@POINTWISE.register("sign", supports=_not_bool)
def _sign(ctx, node):
    x = ctx.arg(0)
    if _out(node).is_float:  # 0, -0 and NaN give themselves
        return f"tl.where({x} > 0, 1.0, tl.where({x} < 0, -1.0, {x}))"
    return f"tl.where({x} > 0, 1, tl.where({x} < 0, -1, 0))"


@POINTWISE.register("cast")
def _cast(ctx, node):
    # the operand in its own compute type, converted to the output's (rounding to f16/bf16
    # follows from the output dtype, as after every op)
    return ctx.arg(0)


@POINTWISE.register("where")
def _where(ctx, node):
    return f"tl.where({ctx.arg(0, DType.bool)}, {ctx.arg(1)}, {ctx.arg(2)})"


@POINTWISE.register("clamp", supports=_not_bool)
def _clamp(ctx, node):
    x, dtype = ctx.arg(0), _out(node)
    lo, hi = node.attrs["min"], node.attrs["max"]
    if not dtype.is_float:  # integer stays integer: bounds rounded inward
        lo = None if lo is None or math.isinf(lo) and lo < 0 else math.ceil(lo)
        hi = None if hi is None or math.isinf(hi) and hi > 0 else math.floor(hi)
    if lo is not None:  # compare-and-select keeps NaN, as torch.clamp
        lit = format_literal(lo, dtype)
        x = f"tl.where({x} < {lit}, {lit}, {x})"
    if hi is not None:
        lit = format_literal(hi, dtype)
        x = f"tl.where({x} > {lit}, {lit}, {x})"
    return x


def _identity_supports(node: Node) -> str | None:
    if node.op == "dropout" and node.attrs["train"]:
        return "dropout in training mode is random: not generated"
    return None


POINTWISE.register("identity", "dropout", supports=_identity_supports)(
    lambda ctx, node: ctx.arg(0))


@POINTWISE.register("swiglu")
def _swiglu(ctx, node):
    # silu(gate) is a tensor of gate's dtype in the reference: rounded before the product
    g = ctx.arg(0, _in(node, 0))
    act = f"({g} * tl.sigmoid({g}))"
    if _in(node, 0) in ROUNDED:
        act = f"{act}.to({ROUNDED[_in(node, 0)]}).to(tl.float32)"
    return f"({act} * {ctx.arg(1)})"


# -- reductions and row ops -----------------------------------------------------------------


def row_levels(node: Node) -> int:
    """How many reductions in a chain a reduction or row op takes (passes over a row)."""
    if node.op in REDUCTIONS or node.op == "rms_norm":
        return 1
    if node.op == "add_norm":
        return 1 if node.attrs["kind"] == "rms" else 2
    return 2  # softmax, log_softmax: max then sum; layer_norm: mean then variance


def reduction_problem(node: Node) -> str | None:
    """Why a reduction or row op cannot be generated (None when it can)."""
    x = node.inputs[0]
    rank = x.type.rank
    if node.op in ("rms_norm", "layer_norm", "add_norm"):
        nd = node.attrs["normalized_ndim"]
        if nd != 1:
            return (f"{node.op} over the last {nd} dims: generated kernels normalise the "
                    f"last dim only")
        if any(v is not None and v.dtype not in FLOATS for v in node.inputs) or \
                node.outputs[0].dtype not in FLOATS:
            return f"{node.op} of {x.type}: only float norms are generated"
        return None
    if node.op in REDUCTIONS:
        axes = tuple(sorted(a % max(rank, 1) for a in node.attrs["axes"])) or tuple(range(rank))
        if axes != (rank - 1,) or rank == 0:
            return (f"{node.op} over axes {list(node.attrs['axes'])} of {x.type}: only the last "
                    f"dim is reduced in a generated kernel")
    else:
        if rank == 0 or node.attrs["axis"] % rank != rank - 1:
            return (f"{node.op} over axis {node.attrs['axis']} of {x.type}: only the last dim is "
                    f"reduced in a generated kernel")
    if x.dtype not in FLOATS or node.outputs[0].dtype not in FLOATS:
        return f"{node.op} of {x.type}: only float reductions are generated"
    return None


__all__ = ["POINTWISE", "REDUCTIONS", "ROW_OPS", "VIEWS", "REORDERING_VIEWS", "COMPUTE",
           "POINTER", "ROUNDED", "FLOATS", "HELPERS", "ExprContext", "literal_value",
           "format_literal", "dtype_problem", "reduction_problem", "row_levels"]
