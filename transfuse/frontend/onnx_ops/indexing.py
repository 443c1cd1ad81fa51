"""ONNX gathers and scatters: Gather (a 2-D constant on axis 0 -> ``embedding``),
GatherElements (-> ``gather``), GatherND (-> ``index``), ScatterND and ScatterElements
(-> ``scatter_nd``)."""

from __future__ import annotations

import numpy as np

from transfuse.frontend.build import cast, to_shape
from transfuse.frontend.onnx_ops.helpers import axis_of, rank, wrap_index
from transfuse.frontend.onnx_ops.known import KNOWN_MAX, Known, known, obj_array
from transfuse.frontend.onnx_ops.registry import onnx_op
from transfuse.ir.graph import Value
from transfuse.ir.opdefs.indexing import SCATTER_REDUCTIONS
from transfuse.ir.types import DType, dim_product, dims_equal

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
        taken = obj_array(np.take(kx.data, np.array(flat, dtype=np.int64).reshape(ki.shape),
                             axis=axis))
        if taken.size <= KNOWN_MAX:
            return [Known(taken, kx.dtype)]
    v = cx.value(x)
    if axis == 0 and r == 2 and v.is_const and ki is None and isinstance(idx, Value):
        return [cx.op("embedding", v, idx)]  # token ids are >= 0 (negative ones raise)
    index = wrap_index(cx, idx, v.shape[axis])
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
    index = wrap_index(cx, node.input(1), v.shape[axis])
    return [cx.op("gather", v, index, axis=axis)]


@onnx_op("GatherND")
def _gather_nd(cx, node):
    """data[i_0, .., i_{k-1}] with the k index components stacked in the last axis of
    ``indices``: ``index`` on the leading k dims, one input per component, as the torch
    frontend captures advanced indexing (so the mask analysis reads the components, e.g.
    arange-based ones). ``batch_dims`` b: the first b components are the batch positions."""
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
    return [cx.op("index", x, *comps, axes=list(range(len(comps))))]


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


@onnx_op("ScatterND")
def _scatter_nd(cx, node):
    """A copy of data with the slices ``indices`` [*I, k] addresses replaced by (or reduced
    with) ``updates``: ``scatter_nd`` (same semantics, negative indices included)."""
    x, idx, upd = (cx.value(node.input(i)) for i in range(3))
    reduction = node.attr("reduction", "none")
    if reduction not in SCATTER_REDUCTIONS:
        raise cx.unsupported(f"ScatterND reduction {reduction!r} (known: {SCATTER_REDUCTIONS})")
    return [cx.op("scatter_nd", x, idx, upd, reduction=reduction)]


@onnx_op("ScatterElements")
def _scatter_elements(cx, node):
    """data with data[.., indices[p], ..] (along ``axis``, the other dims at p's own
    position) replaced by (or reduced with) updates[p] for every position p of indices:
    ``scatter_nd`` on the full coordinates, the other components aranges."""
    x, idx, upd = (cx.value(node.input(i)) for i in range(3))
    r = x.type.rank
    axis = axis_of(cx, node.attr("axis", 0), r)
    reduction = node.attr("reduction", "none")
    if reduction not in SCATTER_REDUCTIONS:
        raise cx.unsupported(f"ScatterElements reduction {reduction!r} "
                             f"(known: {SCATTER_REDUCTIONS})")
    if idx.type.rank != r:
        raise cx.fail(f"indices {idx.type} must have the rank of data {x.type}")
    shape = list(idx.shape)
    comps = []
    for d in range(r):
        if d == axis:
            comp = cast(cx, idx, DType.i64)
        else:
            view = [1] * r
            view[d] = shape[d]
            pos = cx.op("arange", start=0, end=shape[d], step=1, dtype=DType.i64)
            comp = cx.op("expand", to_shape(cx, pos, view), shape=shape)
        comps.append(to_shape(cx, comp, shape + [1]))
    coords = comps[0] if r == 1 else cx.emit("concat", comps, {"axis": r})
    return [cx.op("scatter_nd", x, coords, upd, reduction=reduction)]
