"""ONNX shape ops: Shape, Size, Reshape (a Reshape of a Transpose of a Reshape that only
moves trailing dims -> one ``permute``), Flatten, Squeeze, Unsqueeze, Transpose, Expand,
Concat, Split, Slice, Tile."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import sympy
import torch

from transfuse.frontend.build import to_shape
from transfuse.frontend.onnx_ops.helpers import (
    axes_arg,
    axis_of,
    check_constant_size,
    check_shape_values,
    full_value,
    rank,
    reshaped,
)
from transfuse.frontend.onnx_ops.known import KNOWN_MAX, Known, is_concrete_shape, known, known_ints
from transfuse.frontend.onnx_ops.registry import INT64_MAX, INT64_MIN, onnx_op
from transfuse.ir.graph import Value
from transfuse.ir.types import DType, broadcast_shapes, dim_product, dims_equal, normalize_dim


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
    out = check_shape_values(cx, out)
    if not dims_equal(dim_product(out), dim_product(src)):
        raise cx.fail(f"cannot reshape {list(src)} to {out}: the element counts differ")
    return out


@onnx_op("Reshape")
def _reshape(cx, node):
    x = node.input(0)
    target = known_ints(cx, node, 1, "shape")
    shape = _resolve_reshape(cx, x.shape, target, bool(node.attr("allowzero", 0)))
    if isinstance(x, Known):
        return [reshaped(cx, x, shape)]
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
    return [reshaped(cx, x, shape)]



@onnx_op("Squeeze")
def _squeeze(cx, node):
    x = node.input(0)
    r = rank(x)
    axes = axes_arg(cx, node, 1)
    if axes is None or not axes:
        drop = {i for i, d in enumerate(x.shape) if isinstance(d, int) and d == 1}
    else:
        drop = {axis_of(cx, a, r) for a in axes}
        bad = [i for i in drop if not (isinstance(x.shape[i], int) and x.shape[i] == 1)]
        if bad:
            raise cx.fail(f"cannot squeeze axes {sorted(bad)} of {list(x.shape)}: not size 1")
    shape = [d for i, d in enumerate(x.shape) if i not in drop]
    return [reshaped(cx, x, shape)]


@onnx_op("Unsqueeze")
def _unsqueeze(cx, node):
    x = node.input(0)
    axes = axes_arg(cx, node, 1) or []
    out_rank = rank(x) + len(axes)
    axes = sorted(axis_of(cx, a, out_rank) for a in axes)
    if len(set(axes)) != len(axes):
        raise cx.fail(f"axes {axes} repeat")
    dims = iter(x.shape)
    shape = [1 if i in axes else next(dims) for i in range(out_rank)]
    return [reshaped(cx, x, shape)]


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
    target = check_shape_values(cx, known_ints(cx, node, 1, "shape"))
    try:
        out = list(broadcast_shapes(tuple(x.shape), tuple(target)))
    except Exception as e:  # noqa: BLE001
        raise cx.fail(f"cannot expand {list(x.shape)} to {target}: {e}") from None
    k = known(cx, x)
    if _is_constant(x):  # a constant broadcast to a static shape is a constant of that size
        check_constant_size(cx, out, x.dtype, f"a constant expanded to {out}")
    if k is not None and is_concrete_shape(out) and math.prod(out) <= KNOWN_MAX:
        return [Known(np.broadcast_to(k.data, out), k.dtype)]
    if all(dims_equal(a, b) for a, b in zip(x.shape, out)) and rank(x) == len(out):
        return [x]
    if k is not None and k.data.size == 1 and k.is_concrete:  # torch.ones / full
        return [full_value(cx, out, k.elements()[0], k.dtype)]
    v = cx.value(x)
    return [cx.op("expand", to_shape(cx, v, [1] * (len(out) - v.type.rank) + list(v.shape))
                  if v.type.rank < len(out) else v, shape=out)]


def _is_constant(x: Any) -> bool:
    return isinstance(x, Known) or (isinstance(x, Value) and x.is_const)


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
    check_constant_size(cx, [size], DType.i64, "the index of a reversing Slice")
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
    if _is_constant(x):  # a constant tiled to a static shape is a constant of that size
        check_constant_size(cx, out, x.dtype, f"a constant tiled to {out}")
    if isinstance(x, Known) and all(isinstance(r, int) for r in reps) and \
            is_concrete_shape(out) and math.prod(out) <= KNOWN_MAX:
        return [Known(np.tile(k.data, reps), k.dtype)]
    v = cx.value(x)
    if all(isinstance(r, int) and r == 1 for r in reps):
        return [v]
    inter = [q for d in v.shape for q in (1, d)]
    big = [q for r, d in zip(reps, v.shape) for q in (r, d)]
    y = cx.op("expand", to_shape(cx, v, inter), shape=big)
    return [to_shape(cx, y, out)]
