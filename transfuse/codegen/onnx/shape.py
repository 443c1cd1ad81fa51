"""ONNX lowerings of the shape and data-movement ops (``transfuse/ir/opdefs/shape.py``).

``reshape`` and ``permute`` record the [B, S, H*D] <-> [B, S, H, D] <-> [B, H, S, D] views
(the builder's ``split_heads`` / ``heads_first``) that attention and rotary lowerings look
through. Glossary: B batch, S sequence, H heads, D head dim.
"""

from __future__ import annotations

from onnx import helper

from transfuse.codegen.onnx.registry import LOWERINGS
from transfuse.codegen.onnx.tensors import onnx_dtype
from transfuse.ir.opdefs.shape import INT64_MAX
from transfuse.ir.types import DType, dims_equal


@LOWERINGS.register("reshape")
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


@LOWERINGS.register("permute")
def _permute(b, node):
    x, perm = node.inputs[0], tuple(node.attrs["perm"])
    out = b.add("Transpose", [b.name(x)], perm=list(perm))
    if perm == (0, 2, 1, 3):  # heads <-> sequence: the flat [B, S, H*D] form carries over
        if id(x) in b.split_heads:
            b.heads_first[id(node.outputs[0])] = b.split_heads[id(x)]
        elif id(x) in b.heads_first:
            b.split_heads[id(node.outputs[0])] = b.heads_first[id(x)]
    return out


@LOWERINGS.register("expand")
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


@LOWERINGS.register("concat")
def _concat(b, node):
    return b.add("Concat", [b.name(v) for v in node.inputs], axis=node.attrs["axis"])


@LOWERINGS.register("split")
def _split(b, node):
    x, axis = node.inputs[0], node.attrs["axis"]
    outs = b.split(b.name(x), node.attrs["sizes"], axis)
    if axis % x.type.rank == x.type.rank - 1:  # parts of a packed projection (q|k|v)
        for i, name in enumerate(outs):
            b.split_of[name] = (b.name(x), i, len(outs))
    return outs


@LOWERINGS.register("slice")
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


@LOWERINGS.register("index_select")
def _index_select(b, node):
    return b.add("Gather", [b.input(node, 0), b.input(node, 1)], axis=node.attrs["axis"])


@LOWERINGS.register("gather")
def _gather(b, node):
    return b.add("GatherElements", [b.input(node, 0), b.input(node, 1)],
                 axis=node.attrs["axis"])


@LOWERINGS.register("embedding")
def _embedding(b, node):
    return b.add("Gather", [b.input(node, 0), b.input(node, 1)], axis=0)


_RANGE_DTYPES = (DType.f32, DType.f64, DType.i16, DType.i32, DType.i64)


@LOWERINGS.register("arange")
def _arange(b, node):
    a = node.attrs
    dtype = a["dtype"]
    rd = dtype if dtype in _RANGE_DTYPES else (DType.f32 if dtype.is_float else DType.i64)
    out = b.add("Range", [b.scalar_dim(a["start"], rd), b.scalar_dim(a["end"], rd),
                          b.const(a["step"], rd, "step")])
    return b.cast(out, rd, dtype)


@LOWERINGS.register("full")
def _full(b, node):
    a = node.attrs
    dtype = a["dtype"]
    value = a["value"]
    if dtype == DType.bool:
        value = bool(value)
    elif not dtype.is_float:
        value = int(value)
    tensor = helper.make_tensor("value", onnx_dtype(dtype), [1], [value])
    return b.add("ConstantOfShape", [b.shape(a["shape"])], value=tensor)


@LOWERINGS.register("tril", "triu")
def _trilu(b, node):
    return b.add("Trilu", [b.input(node, 0), b.const(node.attrs["diagonal"], DType.i64, "k")],
                 upper=int(node.op == "triu"))


@LOWERINGS.register("shape_of")
def _shape_of(b, node):
    x = node.inputs[0]
    axis = node.attrs["axis"] % x.type.rank
    return b.add("Reshape", [b.add("Shape", [b.name(x)], start=axis, end=axis + 1),
                             b.ints([])])
