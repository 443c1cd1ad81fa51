"""The aten -> IR table: one entry per aten overload (``add.Tensor``) or packet (``add``).

A converter is ``fn(cx, a) -> result`` where ``a`` holds the call's arguments
by schema name (defaults filled in) and ``cx`` is the frontend's converter
(``transfuse.frontend.torch_export._Converter``): ``cx.value(x)`` is the IR
value of a tensor argument, ``cx.dim(x)`` / ``cx.scalar(x)`` a (symbolic)
number, ``cx.out_type()`` torch's type of the node's result, ``cx.op(...)``
creates an IR node carrying the user's source. The result is an IR value, a
list of them (multi-output ops), a python scalar, ``None`` (dropped asserts) or
:data:`FALLBACK` to keep the node as ``torch_fallback``.

Conventions every entry follows:

- shapes of view-like ops (view, reshape, unsqueeze, expand, ...) are read from
  torch's meta output shape, so ``-1`` and SymInt arithmetic are already resolved;
- python scalars in binary ops become 0-d constants of the dtype torch's
  promotion gives them, so the IR-inferred dtype equals torch's;
- negative dims/axes are normalised to positive;
- ops without an entry, or whose arguments the IR cannot express, fall back.

Glossary for attention: B batch, H heads, Hkv kv heads, S query length, T key length, D head dim.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import sympy
import torch
import torch.fx as fx

from transfuse.errors import CaptureError
from transfuse.ir.graph import Value
from transfuse.ir.opdefs._util import result_dtype
from transfuse.ir.types import DType, TensorType, dims_equal, normalize_dim

FALLBACK = object()  # a converter returns this to keep the node as torch_fallback
INT64_MAX = 2**63 - 1

Converter = Callable[[Any, dict], Any]
TABLE: dict[str, Converter] = {}


def aten(*names: str) -> Callable[[Converter], Converter]:
    """Register a converter for aten overloads (``"add.Tensor"``) or packets (``"add"``)."""

    def deco(fn: Converter) -> Converter:
        for name in names:
            if name in TABLE:
                raise ValueError(f"aten op {name} registered twice")
            TABLE[name] = fn
        return fn

    return deco


def lookup(target: torch._ops.OpOverload) -> Converter | None:
    schema = target._schema
    ns, _, name = schema.name.partition("::")
    if ns != "aten":
        return None
    return TABLE.get(f"{name}.{schema.overload_name or 'default'}") or TABLE.get(name)


# -- small helpers ---------------------------------------------------------------


def _axis(d: int, rank: int) -> int:
    if not -max(rank, 1) <= d < max(rank, 1):
        raise CaptureError(f"dim {d} out of range for rank {rank}")
    return d % max(rank, 1)


def _args(a: dict) -> list:
    return list(a.values())


def _is_tensor_arg(cx, x) -> bool:
    return isinstance(x, fx.Node) and isinstance(cx.lookup(x), Value)


def _scalar_dtype(ref: DType, s: Any) -> DType:
    """The dtype torch gives python scalar ``s`` next to a tensor of dtype ``ref``."""
    probe = 1 if isinstance(s, sympy.Basic) else s
    return DType.from_torch(torch.result_type(torch.empty(1, dtype=ref.torch), probe))


def operand(cx, x: Any, ref: DType) -> Value:
    """A tensor argument's value, or a python/symbolic scalar as a 0-d constant."""
    if _is_tensor_arg(cx, x):
        return cx.value(x)
    s = cx.scalar(x)
    dtype = _scalar_dtype(ref, s)
    if isinstance(s, sympy.Basic):
        return sym_value(cx, s, dtype)
    return cx.const(s, dtype)


def operands(cx, x: Any, y: Any) -> tuple[Value, Value]:
    if _is_tensor_arg(cx, x):
        vx = cx.value(x)
        return vx, operand(cx, y, vx.dtype)
    if _is_tensor_arg(cx, y):
        vy = cx.value(y)
        return operand(cx, x, vy.dtype), vy
    want = cx.out_type().dtype
    return operand(cx, x, want), operand(cx, y, want)


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


def _full(cx, value: Any) -> Value:
    t = cx.out_type()
    if isinstance(value, sympy.Basic):
        v = sym_value(cx, value, t.dtype)
        return v if t.rank == 0 else cx.op("expand", v, shape=list(t.shape))
    if isinstance(value, Value):
        v = cast(cx, value, t.dtype)
        return v if t.rank == 0 else cx.op("expand", v, shape=list(t.shape))
    if not t.dtype.is_float and isinstance(value, int) and abs(value) > 2**53:
        v = cx.const(value, t.dtype)  # not exactly representable as the float attr
        return v if t.rank == 0 else cx.op("expand", v, shape=list(t.shape))
    return cx.op("full", shape=list(t.shape), value=float(value), dtype=t.dtype)


# -- elementwise ---------------------------------------------------------------------

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
#: bit operations are logical ones on bool tensors (integer ones fall back)
BITWISE_ON_BOOL = {
    f"{prefix}{op}{suffix}": f"logical_{op}"
    for op in ("and", "or", "xor")
    for prefix, suffix in (("bitwise_", ""), ("__", "__"))
}


def _unary(ir_op: str) -> Converter:
    return lambda cx, a: cx.op(ir_op, cx.value(_args(a)[0]))


def _binary(ir_op: str) -> Converter:
    def convert(cx, a):
        x, y = _args(a)[:2]
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
        x, y = _args(a)[:2]
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
    x, y = _args(a)[:2]
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
    if _is_tensor_arg(cx, a["value"]):
        fill = cast(cx, cx.value(a["value"]), x.dtype)
    else:
        value = cx.scalar(a["value"])
        fill = (
            sym_value(cx, value, x.dtype)
            if isinstance(value, sympy.Basic)
            else cx.const(value, x.dtype)
        )
    return cx.op("where", mask, fill, x)


# -- casts and identities -----------------------------------------------------------


@aten("_to_copy", "to", "type_as", "_to_dtype")
def _to(cx, a):
    x = cx.value(_args(a)[0])
    return cast(cx, x, cx.out_type().dtype)


@aten(
    "clone",
    "contiguous",
    "alias",
    "detach",
    "detach_",
    "lift_fresh_copy",
    "lift_fresh",
    "resolve_conj",
    "resolve_neg",
    "_conj",
)
def _identity(cx, a):
    return cx.value(_args(a)[0])


@aten("copy")
def _copy(cx, a):
    """copy(self, src): src broadcast to self's shape, in self's dtype (functionalized ``copy_``)."""
    want = cx.out_type()
    src = cast(cx, cx.value(a["src"]), want.dtype)
    if src.type.rank == want.rank and all(dims_equal(p, q) for p, q in zip(src.shape, want.shape)):
        return src
    return cx.op("expand", src, shape=list(want.shape))


@aten("dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout")
def _dropout(cx, a):
    return cx.op("dropout", cx.value(a["input"]), p=float(a["p"]), train=bool(a["train"]))


@aten("native_dropout")
def _native_dropout(cx, a):
    if a["train"] or _uses_outputs(cx.current, {1}):
        return FALLBACK
    return [cx.op("dropout", cx.value(a["input"]), p=float(a["p"]), train=False), None]


def _uses_outputs(n: fx.Node, indices: set[int]) -> bool:
    """Whether any getitem user of a multi-output node reads one of ``indices``."""
    for u in n.users:
        if getattr(u.target, "__name__", "") != "getitem":
            return True
        if u.args[1] in indices and u.users:
            return True
    return False


# -- shapes --------------------------------------------------------------------------


@aten(
    "view",
    "reshape",
    "_unsafe_view",
    "view_as",
    "reshape_as",
    "unsqueeze",
    "squeeze",
    "flatten",
    "unflatten",
    "_reshape_alias",
    "view_copy",
    "squeeze_copy",
    "unsqueeze_copy",
)
def _reshape(cx, a):
    return to_shape(cx, cx.value(_args(a)[0]), cx.out_type().shape)


@aten("expand", "expand_as", "expand_copy", "broadcast_to")
def _expand(cx, a):
    x, shape = cx.value(_args(a)[0]), cx.out_type().shape
    if x.type.rank == len(shape) and all(dims_equal(p, q) for p, q in zip(x.shape, shape)):
        return x
    return cx.op("expand", x, shape=list(shape))


def _permute_value(cx, x: Value, perm: list[int]) -> Value:
    if perm == list(range(len(perm))):
        return x
    return cx.op("permute", x, perm=perm)


@aten("permute", "permute_copy")
def _permute(cx, a):
    x = cx.value(a["self"])
    return _permute_value(cx, x, [_axis(d, x.type.rank) for d in a["dims"]])


@aten("transpose.int", "transpose_copy.int")
def _transpose(cx, a):
    x = cx.value(a["self"])
    r = x.type.rank
    if r < 2:
        return x
    perm = list(range(r))
    i, j = _axis(a["dim0"], r), _axis(a["dim1"], r)
    perm[i], perm[j] = perm[j], perm[i]
    return _permute_value(cx, x, perm)


@aten("t", "numpy_T")
def _t(cx, a):
    x = cx.value(a["self"])
    r = x.type.rank
    return _permute_value(cx, x, list(range(r))[::-1]) if r >= 2 else x


@aten("mT", "mH", "adjoint")
def _mt(cx, a):
    x = cx.value(a["self"])
    if cx.out_type().dtype != x.dtype or x.type.rank < 2:
        return FALLBACK
    perm = list(range(x.type.rank))
    perm[-2], perm[-1] = perm[-1], perm[-2]
    return _permute_value(cx, x, perm)


@aten("movedim.int")
def _movedim(cx, a):
    x = cx.value(a["self"])
    r = x.type.rank
    src, dst = _axis(a["source"], r), _axis(a["destination"], r)
    perm = [d for d in range(r) if d != src]
    perm.insert(dst, src)
    return _permute_value(cx, x, perm)


@aten("repeat")
def _repeat(cx, a):
    """x.repeat(r0, r1, ...) = reshape(expand(reshape(x, [1, d0, 1, d1, ...]), [r0, d0, ...]))."""
    x = cx.value(a["self"])
    reps = [cx.dim(r) for r in a["repeats"]]
    dims = [1] * (len(reps) - x.type.rank) + list(x.shape)
    if all(isinstance(r, int) and r == 1 for r in reps):
        return to_shape(cx, x, cx.out_type().shape)
    inter = [v for d in dims for v in (1, d)]
    big = [v for r, d in zip(reps, dims) for v in (r, d)]
    y = cx.op("expand", to_shape(cx, x, inter), shape=big)
    return to_shape(cx, y, cx.out_type().shape)


def _norm_index(i: Any, size: Any) -> Any:
    """A (possibly negative, possibly symbolic) index into a dim of ``size``, made >= 0."""
    if isinstance(i, int):
        if i < 0:
            return max(0, size + i) if isinstance(size, int) else normalize_dim(size + i)
        if isinstance(size, int):
            return min(i, size)
        return size if i >= INT64_MAX // 2 else i
    if i.is_negative:
        return normalize_dim(size + i)
    return i


@aten("slice.Tensor", "slice_copy.Tensor")
def _slice(cx, a):
    x = cx.value(a["self"])
    axis = _axis(a["dim"], x.type.rank)
    size = x.shape[axis]
    start = 0 if a["start"] is None else _norm_index(cx.dim(a["start"]), size)
    end = size if a["end"] is None else _norm_index(cx.dim(a["end"]), size)
    step = cx.dim(a["step"])
    if not isinstance(step, int):
        return FALLBACK
    if step == 1 and start == 0 and dims_equal(end, size):
        return x
    return cx.op("slice", x, axis=axis, start=start, end=end, step=step)


@aten("select.int", "select_copy.int")
def _select(cx, a):
    x = cx.value(a["self"])
    axis = _axis(a["dim"], x.type.rank)
    i = _norm_index(cx.dim(a["index"]), x.shape[axis])
    y = cx.op("slice", x, axis=axis, start=i, end=normalize_dim(i + 1), step=1)
    return to_shape(cx, y, cx.out_type().shape)


@aten("narrow")
def _narrow(cx, a):
    x = cx.value(a["self"])
    axis = _axis(a["dim"], x.type.rank)
    start = _norm_index(cx.dim(a["start"]), x.shape[axis])
    end = normalize_dim(start + cx.dim(a["length"]))
    return cx.op("slice", x, axis=axis, start=start, end=end, step=1)


def _scatter_into(cx, x: Value, src: Value, axis: int, start: Any, end: Any) -> Value:
    """``x`` with ``x[start:end]`` along ``axis`` replaced by ``src``: a concat of three parts."""
    size = x.shape[axis]
    parts = []
    if not (isinstance(start, int) and start == 0):
        parts.append(cx.op("slice", x, axis=axis, start=0, end=start, step=1))
    parts.append(cast(cx, src, x.dtype))
    if not dims_equal(end, size):
        parts.append(cx.op("slice", x, axis=axis, start=end, end=size, step=1))
    return parts[0] if len(parts) == 1 else cx.emit("concat", parts, {"axis": axis})


@aten("slice_scatter")
def _slice_scatter(cx, a):
    x, src = cx.value(a["self"]), cx.value(a["src"])
    axis = _axis(a["dim"], x.type.rank)
    size = x.shape[axis]
    start = 0 if a["start"] is None else _norm_index(cx.dim(a["start"]), size)
    end = size if a["end"] is None else _norm_index(cx.dim(a["end"]), size)
    if cx.dim(a["step"]) != 1:
        return FALLBACK
    return _scatter_into(cx, x, src, axis, start, end)


@aten("select_scatter")
def _select_scatter(cx, a):
    x, src = cx.value(a["self"]), cx.value(a["src"])
    axis = _axis(a["dim"], x.type.rank)
    i = _norm_index(cx.dim(a["index"]), x.shape[axis])
    shape = list(src.shape)
    shape.insert(axis, 1)
    return _scatter_into(cx, x, to_shape(cx, src, shape), axis, i, normalize_dim(i + 1))


@aten("index_select")
def _index_select(cx, a):
    x = cx.value(a["self"])
    return cx.op("index_select", x, cx.value(a["index"]), axis=_axis(a["dim"], x.type.rank))


@aten("gather")
def _gather(cx, a):
    x = cx.value(a["self"])
    return cx.op("gather", x, cx.value(a["index"]), axis=_axis(a["dim"], x.type.rank))


@aten("cat")
def _cat(cx, a):
    want = cx.out_type()
    parts = [cx.value(t) for t in a["tensors"]]
    parts = [p for p in parts if not (p.type.rank == 1 and p.shape[0] == 0 and want.rank != 1)]
    parts = [cast(cx, p, want.dtype) for p in parts]
    if len(parts) == 1:
        return parts[0]
    return cx.emit("concat", parts, {"axis": _axis(a["dim"], want.rank)})


@aten("stack")
def _stack(cx, a):
    want = cx.out_type()
    axis = _axis(a["dim"], want.rank)
    parts = []
    for t in a["tensors"]:
        v = cast(cx, cx.value(t), want.dtype)
        shape = list(v.shape)
        shape.insert(axis, 1)
        parts.append(to_shape(cx, v, shape))
    return parts[0] if len(parts) == 1 else cx.emit("concat", parts, {"axis": axis})


@aten(
    "split",
    "split_with_sizes",
    "unsafe_split",
    "unsafe_split_with_sizes",
    "chunk",
    "tensor_split.sections",
    "split_copy",
    "split_with_sizes_copy",
)
def _split(cx, a):
    x = cx.value(a["self"])
    axis = _axis(a["dim"], x.type.rank)
    outs = cx.out_val()
    sizes = [cx.meta_type(cx.current, o).shape[axis] for o in outs]
    if len(sizes) == 1:
        return [x]
    return list(cx.emit("split", [x], {"axis": axis, "sizes": sizes}))


@aten("unbind.int", "unbind_copy.int")
def _unbind(cx, a):
    x = cx.value(a["self"])
    axis = _axis(a["dim"], x.type.rank)
    n = x.shape[axis]
    if not isinstance(n, int):
        return FALLBACK
    parts = [x] if n == 1 else list(cx.emit("split", [x], {"axis": axis, "sizes": [1] * n}))
    return [to_shape(cx, p, cx.meta_type(cx.current, o).shape) for p, o in zip(parts, cx.out_val())]


# -- reductions and softmax ---------------------------------------------------------


def _axes(dims: Any, rank: int) -> tuple[int, ...]:
    if dims is None:
        return ()
    if isinstance(dims, int):
        dims = [dims]
    return tuple(sorted(_axis(d, rank) for d in dims))


def _reduce(ir_op: str) -> Converter:
    def convert(cx, a):
        want = cx.out_type().dtype
        x = cast(cx, cx.value(a["self"]), want)  # dtype= argument, or int sums -> i64
        return cx.op(
            ir_op, x, axes=_axes(a.get("dim"), x.type.rank), keepdim=bool(a.get("keepdim"))
        )

    return convert


aten("sum.dim_IntList", "sum.default")(_reduce("reduce_sum"))
aten("mean.dim", "mean.default")(_reduce("reduce_mean"))
aten("amax", "max.default")(_reduce("reduce_max"))
aten("amin", "min.default")(_reduce("reduce_min"))


def _max_min_dim(ir_op: str, index_op: str | None) -> Converter:
    """max.dim / min.dim -> (values, indices); indices only when used (no argmin op)."""

    def convert(cx, a):
        x = cx.value(a["self"])
        axis, keep = _axis(a["dim"], x.type.rank), a["keepdim"]
        indices = None
        if _uses_outputs(cx.current, {1}):
            if index_op is None:
                return FALLBACK
            indices = cx.op(index_op, x, axis=axis, keepdim=keep)
        return [cx.op(ir_op, x, axes=(axis,), keepdim=keep), indices]

    return convert


aten("max.dim")(_max_min_dim("reduce_max", "argmax"))
aten("min.dim")(_max_min_dim("reduce_min", None))


@aten("argmax")
def _argmax(cx, a):
    if a["dim"] is None:
        return FALLBACK
    x = cx.value(a["self"])
    return cx.op("argmax", x, axis=_axis(a["dim"], x.type.rank), keepdim=a["keepdim"])


def _softmax(ir_op: str) -> Converter:
    def convert(cx, a):
        x = cast(cx, cx.value(a["self"]), cx.out_type().dtype)  # dtype= / half_to_float
        return cx.op(ir_op, x, axis=_axis(a["dim"], x.type.rank))

    return convert


# not _safe_softmax: it gives 0, not NaN, for rows that are all -inf
aten("softmax.int", "_softmax")(_softmax("softmax"))
aten("log_softmax.int", "_log_softmax")(_softmax("log_softmax"))


@aten("cumsum")
def _cumsum(cx, a):
    x = cx.value(a["self"])
    return cx.op("cumsum", x, axis=_axis(a["dim"], x.type.rank), dtype=a["dtype"])


# -- creation -----------------------------------------------------------------------


@aten("full", "full_like", "new_full")
def _full_op(cx, a):
    v = a["fill_value"]
    return _full(cx, cx.value(v) if _is_tensor_arg(cx, v) else cx.scalar(v))


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
    return _full(cx, 0)


@aten("ones", "ones_like", "new_ones")
def _ones(cx, a):
    return _full(cx, 1)


@aten("scalar_tensor")
def _scalar_tensor(cx, a):
    return _full(cx, cx.scalar(a["s"]))


@aten("fill.Scalar")
def _fill(cx, a):
    return _full(cx, cx.scalar(a["value"]))


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


# -- linear algebra and nn -----------------------------------------------------------


@aten("embedding")
def _embedding(cx, a):
    return cx.op("embedding", cx.value(a["weight"]), cx.value(a["indices"]))


@aten("linear")
def _linear(cx, a):
    if cx.value(a["weight"]).type.rank != 2:
        return FALLBACK  # the IR's linear takes a 2-D [N, K] weight
    bias = cx.value(a["bias"]) if a["bias"] is not None else None
    return cx.op("linear", cx.value(a["input"]), cx.value(a["weight"]), bias)


@aten("mm", "bmm", "matmul")
def _matmul(cx, a):
    x, y = _args(a)[:2]
    return cx.op("matmul", cx.value(x), cx.value(y))


@aten("addmm")
def _addmm(cx, a):
    """beta * self + alpha * (mat1 @ mat2), as matmul and add (Hugging Face Conv1D)."""
    out = cx.op("matmul", cx.value(a["mat1"]), cx.value(a["mat2"]))
    if a["alpha"] != 1:
        out = cx.op("mul", out, operand(cx, a["alpha"], out.dtype))
    bias = cx.value(a["self"])
    if a["beta"] != 1:
        bias = cx.op("mul", bias, operand(cx, a["beta"], bias.dtype))
    return cx.op("add", out, bias)


@aten("layer_norm")
def _layer_norm(cx, a):
    w = cx.value(a["weight"]) if a["weight"] is not None else None
    b = cx.value(a["bias"]) if a["bias"] is not None else None
    return cx.op(
        "layer_norm",
        cx.value(a["input"]),
        w,
        b,
        eps=float(a["eps"]),
        normalized_ndim=len(a["normalized_shape"]),
    )


@aten("native_layer_norm")
def _native_layer_norm(cx, a):
    if _uses_outputs(cx.current, {1, 2}):
        return FALLBACK  # mean / rstd are not IR values
    return [_layer_norm(cx, a), None, None]


@aten("rms_norm")
def _rms_norm(cx, a):
    x = cx.value(a["input"])
    if x.dtype not in (DType.f32, DType.f64):
        return FALLBACK  # torch multiplies by the weight before casting back; IR casts first
    eps = a["eps"] if a["eps"] is not None else torch.finfo(x.dtype.torch).eps
    w = cx.value(a["weight"]) if a["weight"] is not None else None
    return cx.op(
        "rms_norm", x, w, eps=float(eps), normalized_ndim=len(a["normalized_shape"]), upcast=True
    )


@aten("scaled_dot_product_attention")
def _sdpa(cx, a):
    """SDPA -> ``attention`` when representable: bool masks become an additive bias,
    ``is_causal`` becomes ``causal`` only when S == T (SDPA aligns top-left, the IR
    bottom-right), ``enable_gqa`` with Hkv < H becomes ``kv_heads``."""
    q, k, v = (cx.value(a[n]) for n in ("query", "key", "value"))
    if any(t.type.rank != 4 for t in (q, k, v)) or a["dropout_p"] != 0:
        return FALLBACK
    causal, mask = bool(a["is_causal"]), a["attn_mask"]
    h, hkv = q.shape[1], k.shape[1]
    if (causal and mask is not None) or not (isinstance(h, int) and isinstance(hkv, int)):
        return FALLBACK
    kv_heads = None
    if hkv != h:
        if not a["enable_gqa"] or h % hkv:
            return FALLBACK
        kv_heads = hkv
    if causal and not dims_equal(q.shape[2], k.shape[2]):
        return FALLBACK
    scale = cx.scalar(a["scale"])
    if scale is not None and not isinstance(scale, (int, float)):
        return FALLBACK
    bias = None
    if mask is not None:
        m = cx.value(mask)
        if m.dtype == DType.bool:
            bias = cx.op("where", m, cx.const(0.0, q.dtype), cx.const(-math.inf, q.dtype))
        elif m.dtype == q.dtype:
            bias = m
        else:
            return FALLBACK
    return cx.op("attention", q, k, v, bias, causal=causal, scale=scale, kv_heads=kv_heads)


# -- symbolic sizes, asserts ---------------------------------------------------------


@aten("sym_size.int", "sym_numel", "sym_stride.int", "sym_storage_offset", "sym_size", "sym_stride")
def _sym(cx, a):
    return cx.meta_scalar(cx.current)


class Opaque:
    """A scalar the IR cannot hold (read from tensor values by ``item()``, or a symbolic
    bool/float); harmless unless a converter needs it, which then raises CaptureError."""

    def __init__(self, node: fx.Node, reason: str):
        self.node = node
        self.reason = reason


@aten("_local_scalar_dense", "item")
def _item(cx, a):
    return Opaque(cx.current, "is read from tensor values (item()); capture needs it static")


@aten(
    "_assert_tensor_metadata",
    "_assert_scalar",
    "sym_constrain_range",
    "sym_constrain_range_for_size",
    "_functional_sym_constrain_range",
    "_functional_sym_constrain_range_for_size",
    "_functional_assert_scalar",
    "_set_grad_enabled",
)
def _drop_assert(cx, a):
    """Shape and metadata asserts: the signature check guarantees them; counted."""
    if cx.current.target._schema.name != "aten::_set_grad_enabled":
        cx.drop_assert()
    return None


@aten("_assert_async")
def _assert_async(cx, a):
    msg = a.get("assert_msg") or ""
    cx.emit("assert", [cast(cx, cx.value(a["self"]), DType.bool)], {"message": msg})
    return None


# -- higher-order ops and fallbacks --------------------------------------------------


def convert_higher_order(cx, n: fx.Node) -> Any:
    """Inline ``wrap_with_set_grad_enabled`` and disabled ``wrap_with_autocast`` regions."""
    name = getattr(n.target, "__name__", str(n.target))
    if name == "wrap_with_set_grad_enabled":
        sub, operands_ = n.args[1], n.args[2:]
    elif name == "wrap_with_autocast":
        enabled = n.args[2]
        if enabled:
            raise CaptureError(
                f"autocast region at {cx.where(n)} changes dtypes at run time; capture the model "
                "in the dtype you want instead"
            )
        sub, operands_ = n.args[4], n.args[5:]
    else:
        raise CaptureError(
            f"{name} at {cx.where(n)}: control flow / higher-order ops are not supported"
        )
    gm = cx.lookup(sub)
    placeholders = [p for p in gm.graph.nodes if p.op == "placeholder"]
    for p, arg in zip(placeholders, operands_):
        cx.env[p] = cx.lookup(arg)
    outs: list = []
    saved = cx.current
    cx.convert_graph(gm.graph, outputs_to=outs)
    cx.current = saved
    return tuple(outs)


class _Drop(Exception):
    pass


_DEFAULT_ENUMS = (torch.strided, torch.preserve_format, torch.contiguous_format)


def emit_fallback(cx, n: fx.Node) -> Any:
    """``n`` as a ``torch_fallback`` node: the call as a JSON template, types from meta."""
    inputs: list[Value] = []

    def enc(x):
        if isinstance(x, fx.Node):
            v = cx.lookup(x)
            if isinstance(v, Value):
                inputs.append(v)
                return {"$in": len(inputs) - 1}
            v = cx.scalar(x)
            if isinstance(v, sympy.Basic):
                raise CaptureError(
                    f"{cx.op_name(n)} at {cx.where(n)} has no IR conversion and takes the "
                    f"symbolic size {v}; it cannot be kept as a torch fallback"
                )
            return v
        if isinstance(x, (list, tuple)):
            return [enc(e) for e in x]
        if isinstance(x, torch.dtype):
            return {"$dtype": str(x).removeprefix("torch.")}
        if isinstance(x, torch.device):
            return str(x)
        if isinstance(x, (torch.layout, torch.memory_format)):
            if x in _DEFAULT_ENUMS:
                raise _Drop
            raise CaptureError(f"{cx.op_name(n)} at {cx.where(n)}: cannot keep argument {x}")
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise CaptureError(f"{cx.op_name(n)} at {cx.where(n)}: cannot encode argument {x!r}")

    try:
        args = [enc(x) for x in n.args]
    except _Drop:
        raise CaptureError(
            f"{cx.op_name(n)} at {cx.where(n)}: cannot keep a positional layout"
        ) from None
    kwargs = {}
    for k, x in n.kwargs.items():
        try:
            kwargs[k] = enc(x)
        except _Drop:
            continue
    val = n.meta.get("val")
    vals = (
        [val]
        if isinstance(val, torch.Tensor)
        else list(val)
        if isinstance(val, (list, tuple))
        else None
    )
    if not vals or not all(isinstance(v, torch.Tensor) for v in vals):
        raise CaptureError(
            f"{cx.op_name(n)} at {cx.where(n)} has no IR conversion and does not "
            "return tensors; it cannot be kept as a torch fallback"
        )
    types: list[TensorType] = [cx.meta_type(n, v) for v in vals]
    target = cx.op_name(n)
    attrs = {"target": target, "args": json.dumps({"args": args, "kwargs": kwargs})}
    out = cx.emit("torch_fallback", inputs, attrs, out_types=types)
    if isinstance(val, torch.Tensor):
        return out
    return [out] if isinstance(out, Value) else list(out)


@aten("index.Tensor")
def _index(cx, a):
    return FALLBACK  # advanced indexing (Hugging Face's mask functions) stays in torch
