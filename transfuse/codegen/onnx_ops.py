"""Per-op lowerings of the onnxruntime backend: one small function per IR op.

A lowering turns one node into ONNX nodes through the :class:`OnnxBuilder`
(``transfuse/codegen/onnx.py``) and returns the ONNX name of each output. It is
registered with ``@lowering("op", supports=...)``; ``supports(node)`` returns a
reason when the op cannot be expressed in ONNX, and the backend raises a
:class:`LoweringError` naming the node and that reason (ONNX has no fallback
into PyTorch). This file holds the standard-op lowerings; the fused
Transformer ops (attention, norms, activations, rotary) are in
:mod:`transfuse.codegen.onnx_fused`.

Types: IR ops follow torch's promotion rules, ONNX ops want equal input types,
so every lowering casts its inputs to the type the IR node computes in.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

from transfuse.errors import LoweringError
from transfuse.ir.graph import Node
from transfuse.ir.opdefs._util import result_dtype
from transfuse.ir.opdefs.shape import INT64_MAX
from transfuse.ir.types import DType, dims_equal

# -- the registry --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OnnxLowering:
    op: str
    lower: Callable[..., object]
    supports: Callable[[Node], str | None] | None = None

    def refuses(self, node: Node) -> str | None:
        return self.supports(node) if self.supports is not None else None


LOWERINGS: dict[str, OnnxLowering] = {}


def lowering(*ops: str, supports: Callable[[Node], str | None] | None = None) -> Callable:
    """Register ``fn(builder, node) -> name | [names]`` as the lowering of ``ops``."""

    def deco(fn: Callable) -> Callable:
        for op in ops:
            if op in LOWERINGS:
                raise ValueError(f"onnx lowering for {op} registered twice")
            LOWERINGS[op] = OnnxLowering(op, fn, supports)
        return fn

    return deco


def get_lowering(op: str) -> OnnxLowering | None:
    return LOWERINGS.get(op)


def out_dtype(node: Node, i: int = 0) -> DType:
    return node.outputs[i].type.dtype


def inputs_as(b, node: Node, dtype: DType, indices=None) -> list[str]:
    idx = range(len(node.inputs)) if indices is None else indices
    return [b.input(node, i, dtype) for i in idx]


def common_dtype(node: Node, indices=(0, 1)) -> DType:
    return result_dtype(*(node.inputs[i].type for i in indices))


# -- elementwise ---------------------------------------------------------------------------------

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
    lowering(_op)(_binary(_t))
for _op, _t in _COMPARE.items():
    lowering(_op)(_compare(_t))
for _op, _t in _LOGICAL.items():
    lowering(_op)(_logical(_t))
for _op, _t in {**_UNARY_FLOAT, **_UNARY_SAME}.items():
    lowering(_op)(_unary(_t))


@lowering("ne")
def _ne(b, node):
    return b.add("Not", [b.add("Equal", inputs_as(b, node, common_dtype(node)))])


@lowering("logical_not")
def _logical_not(b, node):
    return b.add("Not", [b.input(node, 0, DType.bool)])


@lowering("rsqrt")
def _rsqrt(b, node):
    return b.add("Reciprocal", [b.add("Sqrt", [b.input(node, 0, out_dtype(node))])])


@lowering("floor", "ceil")
def _round(b, node):
    x = b.input(node, 0)
    if not out_dtype(node).is_float:
        return x  # integers are already whole
    return b.add("Floor" if node.op == "floor" else "Ceil", [x])


@lowering("floor_div")
def _floor_div(b, node):
    """Floor division: exact ``(a - a mod b) / b`` for integers, ``floor(a / b)`` for floats."""
    dtype = out_dtype(node)
    a, c = inputs_as(b, node, dtype)
    if dtype.is_float:
        return b.add("Floor", [b.add("Div", [a, c])])
    rem = b.add("Mod", [a, c], fmod=0)
    return b.add("Div", [b.add("Sub", [a, rem]), c])


@lowering("remainder")
def _remainder(b, node):
    """Python's remainder (sign of the divisor): Mod for integers, a - b*floor(a/b) for floats."""
    dtype = out_dtype(node)
    a, c = inputs_as(b, node, dtype)
    if not dtype.is_float:
        return b.add("Mod", [a, c], fmod=0)
    q = b.add("Floor", [b.add("Div", [a, c])])
    return b.add("Sub", [a, b.add("Mul", [c, q])])


@lowering("silu")
def _silu(b, node):
    x = b.input(node, 0, out_dtype(node))
    if b.fused:
        return b.ms("QuickGelu", [x], alpha=1.0)  # x * sigmoid(1.0 * x)
    return b.add("Mul", [x, b.add("Sigmoid", [x])])


@lowering("cast")
def _cast(b, node):
    return b.input(node, 0, node.attrs["dtype"])


@lowering("where")
def _where(b, node):
    dtype = out_dtype(node)
    return b.add("Where", [b.input(node, 0, DType.bool), b.input(node, 1, dtype),
                           b.input(node, 2, dtype)])


@lowering("clamp")
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


# -- linear algebra --------------------------------------------------------------------------------


@lowering("matmul")
def _matmul(b, node):
    return b.add("MatMul", inputs_as(b, node, out_dtype(node)))


# -- structure -------------------------------------------------------------------------------------


@lowering("identity")
def _identity(b, node):
    return b.input(node, 0)


def _dropout_supports(node: Node) -> str | None:
    if node.attrs["train"]:
        return "training-mode dropout is random; an exported inference model cannot hold it"
    return None


@lowering("dropout", supports=_dropout_supports)
def _dropout(b, node):
    return b.input(node, 0)


@lowering("assert")
def _assert(b, node):
    """ONNX has no assertion op: the check is dropped (inputs are checked against the
    signature before every call) and the drop is noted in the program's summary."""
    note = f"assert dropped: {node.attrs['message'] or 'a runtime check from capture'}"
    if note not in b.notes:
        b.notes.append(note)
    return None


def _torch_fallback_supports(node: Node) -> str | None:
    return (f"torch_fallback of {node.attrs['target']} runs a PyTorch op that has no ONNX "
            "lowering; use target='python', or teach the frontend an IR op for it")


@lowering("torch_fallback", supports=_torch_fallback_supports)
def _torch_fallback(b, node):  # pragma: no cover - always refused
    raise LoweringError(_torch_fallback_supports(node))


# -- reductions ------------------------------------------------------------------------------------

_REDUCE = {"reduce_sum": "ReduceSum", "reduce_mean": "ReduceMean", "reduce_max": "ReduceMax",
           "reduce_min": "ReduceMin"}


def _reduce(op_type: str):
    def lower(b, node):
        axes = node.attrs["axes"] or None
        x = b.input(node, 0, out_dtype(node))
        if axes is None and node.inputs[0].type.rank == 0:
            return x
        return b.reduce(op_type, x, axes, node.attrs["keepdim"])

    return lower


for _op, _t in _REDUCE.items():
    lowering(_op)(_reduce(_t))


@lowering("argmax")
def _argmax(b, node):
    return b.add("ArgMax", [b.input(node, 0)], axis=node.attrs["axis"],
                 keepdims=int(node.attrs["keepdim"]))


@lowering("softmax", "log_softmax")
def _softmax(b, node):
    op_type = "Softmax" if node.op == "softmax" else "LogSoftmax"
    return b.add(op_type, [b.input(node, 0)], axis=node.attrs["axis"])


@lowering("cumsum")
def _cumsum(b, node):
    return b.add("CumSum", [b.input(node, 0, out_dtype(node)),
                            b.const(node.attrs["axis"], DType.i64, "axis")])


# -- shapes and data movement ----------------------------------------------------------------------


@lowering("reshape")
def _reshape(b, node):
    """Reshape; records the [B, S, H*D] <-> [B, S, H, D] views attention lowerings look through."""
    x = node.inputs[0]
    src, dst = x.type.shape, node.attrs["shape"]
    flat = b.split_heads.get(id(x))
    if flat is not None and len(dst) == 3 and _same_dims(dst, src[:2] + (src[2] * src[3],)):
        return flat  # [B, S, H, D] back to the [B, S, H*D] it came from: no node
    out = b.add("Reshape", [b.name(x), b.reshape_target(dst)])
    if len(src) == 3 and len(dst) == 4 and _same_dims(src[:2], dst[:2]):
        b.split_heads[id(node.outputs[0])] = b.name(x)
    return out


def _same_dims(a, c) -> bool:
    return len(a) == len(c) and all(dims_equal(p, q) for p, q in zip(a, c))


@lowering("permute")
def _permute(b, node):
    x, perm = node.inputs[0], tuple(node.attrs["perm"])
    out = b.add("Transpose", [b.name(x)], perm=list(perm))
    if perm == (0, 2, 1, 3):  # heads <-> sequence: the flat [B, S, H*D] form carries over
        if id(x) in b.split_heads:
            b.heads_first[id(node.outputs[0])] = b.split_heads[id(x)]
        elif id(x) in b.heads_first:
            b.split_heads[id(node.outputs[0])] = b.heads_first[id(x)]
    return out


@lowering("expand")
def _expand(b, node):
    """Expand; a target dim equal to the input's own dim is written as 1 (ONNX broadcasts
    both ways), so symbolic targets rarely need shape arithmetic."""
    x = node.inputs[0]
    target = list(node.attrs["shape"])
    off = len(target) - x.type.rank
    for i, d in enumerate(x.type.shape):
        if dims_equal(d, target[off + i]):
            target[off + i] = 1
    return b.add("Expand", [b.name(x), b.shape(target)])


@lowering("concat")
def _concat(b, node):
    return b.add("Concat", [b.name(v) for v in node.inputs], axis=node.attrs["axis"])


@lowering("split")
def _split(b, node):
    x, axis = node.inputs[0], node.attrs["axis"]
    outs = b.split(b.name(x), node.attrs["sizes"], axis)
    if axis % x.type.rank == x.type.rank - 1:  # parts of a packed projection (q|k|v)
        for i, name in enumerate(outs):
            b.split_of[name] = (b.name(x), i, len(outs))
    return outs


@lowering("slice")
def _slice(b, node):
    a = node.attrs
    x = node.inputs[0]
    if x.producer is not None and id(x.producer) in b.narrowed:
        return b.name(x)  # the linear already computed only these columns (onnx_fused.plan)
    static = all(isinstance(d, int) for d in (a["start"], a["end"]))
    if x.is_const and static:  # rows of a constant (a tied embedding): a view, not a Slice
        axis = a["axis"] % x.type.rank
        if axis == 0 and a["start"] == 0 and a["step"] == 1:  # the key a narrowed linear uses
            return b.derived(("rows", id(x), a["end"]), lambda: x.const[:a["end"]],
                             f"{x.name}_rows")
        index = [slice(None)] * x.type.rank
        index[axis] = slice(a["start"], a["end"], a["step"])
        return b.derived(("slice", id(x), axis, a["start"], a["end"], a["step"]),
                         lambda: x.const[tuple(index)].contiguous(), f"{x.name}_slice")
    end = a["end"]
    end_t = b.ints([INT64_MAX]) if isinstance(end, int) and end >= INT64_MAX // 2 else b.dim(end)
    return b.add("Slice", [b.input(node, 0), b.dim(a["start"]), end_t, b.ints([a["axis"]]),
                           b.ints([a["step"]])])


@lowering("index_select")
def _index_select(b, node):
    return b.add("Gather", [b.input(node, 0), b.input(node, 1)], axis=node.attrs["axis"])


@lowering("gather")
def _gather(b, node):
    return b.add("GatherElements", [b.input(node, 0), b.input(node, 1)],
                 axis=node.attrs["axis"])


@lowering("embedding")
def _embedding(b, node):
    return b.add("Gather", [b.input(node, 0), b.input(node, 1)], axis=0)


_RANGE_DTYPES = (DType.f32, DType.f64, DType.i16, DType.i32, DType.i64)


@lowering("arange")
def _arange(b, node):
    a = node.attrs
    dtype = a["dtype"]
    rd = dtype if dtype in _RANGE_DTYPES else (DType.f32 if dtype.is_float else DType.i64)
    out = b.add("Range", [b.scalar_dim(a["start"], rd), b.scalar_dim(a["end"], rd),
                          b.const(a["step"], rd, "step")])
    return b.cast(out, rd, dtype)


@lowering("full")
def _full(b, node):
    from onnx import helper

    from transfuse.codegen.onnx import onnx_dtype

    a = node.attrs
    dtype = a["dtype"]
    value = a["value"]
    if dtype == DType.bool:
        value = bool(value)
    elif not dtype.is_float:
        value = int(value)
    tensor = helper.make_tensor("value", onnx_dtype(dtype), [1], [value])
    return b.add("ConstantOfShape", [b.shape(a["shape"])], value=tensor)


@lowering("tril", "triu")
def _trilu(b, node):
    return b.add("Trilu", [b.input(node, 0), b.const(node.attrs["diagonal"], DType.i64, "k")],
                 upper=int(node.op == "triu"))


@lowering("shape_of")
def _shape_of(b, node):
    x = node.inputs[0]
    axis = node.attrs["axis"] % x.type.rank
    return b.add("Reshape", [b.add("Shape", [b.name(x)], start=axis, end=axis + 1),
                             b.ints([])])


__all__ = ["LOWERINGS", "OnnxLowering", "lowering", "get_lowering"]


# lowerings of the fused Transformer ops (attention, norms, activations, rotary)
from transfuse.codegen import onnx_fused  # noqa: E402,F401
