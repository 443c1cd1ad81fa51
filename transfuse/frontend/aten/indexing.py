"""aten indexing: slice/select/narrow, slice_scatter/select_scatter, index_select,
gather, advanced ``index.Tensor`` (-> ``index``) and ``index_put`` (-> ``scatter_nd``);
boolean masks stay a torch fallback."""

from __future__ import annotations

from typing import Any

from transfuse.errors import IRVerifyError
from transfuse.frontend.aten.helpers import INT64_MAX, norm_axis
from transfuse.frontend.aten.registry import FALLBACK, aten
from transfuse.frontend.build import cast, to_shape
from transfuse.ir.graph import Value
from transfuse.ir.opdefs.indexing import INDEX_DTYPES
from transfuse.ir.types import DType, broadcast_shapes, dims_equal, normalize_dim


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
    axis = norm_axis(a["dim"], x.type.rank)
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
    axis = norm_axis(a["dim"], x.type.rank)
    i = _norm_index(cx.dim(a["index"]), x.shape[axis])
    y = cx.op("slice", x, axis=axis, start=i, end=normalize_dim(i + 1), step=1)
    return to_shape(cx, y, cx.out_type().shape)


@aten("narrow")
def _narrow(cx, a):
    x = cx.value(a["self"])
    axis = norm_axis(a["dim"], x.type.rank)
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
    axis = norm_axis(a["dim"], x.type.rank)
    size = x.shape[axis]
    start = 0 if a["start"] is None else _norm_index(cx.dim(a["start"]), size)
    end = size if a["end"] is None else _norm_index(cx.dim(a["end"]), size)
    if cx.dim(a["step"]) != 1:
        return FALLBACK
    return _scatter_into(cx, x, src, axis, start, end)


@aten("select_scatter")
def _select_scatter(cx, a):
    x, src = cx.value(a["self"]), cx.value(a["src"])
    axis = norm_axis(a["dim"], x.type.rank)
    i = _norm_index(cx.dim(a["index"]), x.shape[axis])
    shape = list(src.shape)
    shape.insert(axis, 1)
    return _scatter_into(cx, x, to_shape(cx, src, shape), axis, i, normalize_dim(i + 1))


@aten("index_select")
def _index_select(cx, a):
    x = cx.value(a["self"])
    return cx.op("index_select", x, cx.value(a["index"]), axis=norm_axis(a["dim"], x.type.rank))


@aten("gather")
def _gather(cx, a):
    x = cx.value(a["self"])
    return cx.op("gather", x, cx.value(a["index"]), axis=norm_axis(a["dim"], x.type.rank))


@aten("index.Tensor")
def _index(cx, a):
    """x[.., i, .., j, ..] with integer index tensors (Hugging Face's mask functions) ->
    ``index`` on the dims that have one (None entries take a dim whole). A bool/uint8 mask
    index has a data-dependent result shape: it stays a torch fallback."""
    x = cx.value(a["self"])
    axes, idx = [], []
    for axis, i in enumerate(a["indices"]):
        if i is None:
            continue
        v = cx.value(i)
        if v.dtype not in INDEX_DTYPES:
            return FALLBACK
        axes.append(axis)
        idx.append(v)
    if not idx:
        return x
    return cx.op("index", x, *idx, axes=axes)


@aten("index_put")
def _index_put(cx, a):
    """``x[i_0, .., i_{k-1}] = values`` (``+=`` with accumulate) with integer index tensors for
    the leading k dims -> ``scatter_nd`` on their stacked components (values broadcast to
    I + x.shape[k:]). Other index lists (None between indices, bool masks) stay a fallback."""
    x = cx.value(a["self"])
    indices = list(a["indices"])
    if not indices or any(i is None for i in indices):
        return FALLBACK
    idx = [cx.value(i) for i in indices]
    if any(v.dtype not in INDEX_DTYPES for v in idx):
        return FALLBACK
    values = cx.value(a["values"])
    k = len(idx)
    try:
        shape = list(broadcast_shapes(*[v.shape for v in idx]))
        full = shape + list(x.shape[k:])
        broadcast_shapes(values.shape, full)
    except IRVerifyError:
        return FALLBACK
    comps = []
    for v in idx:
        v = cast(cx, v, DType.i64)
        if not all(dims_equal(p, q) for p, q in zip(v.shape, shape)) or v.type.rank != len(shape):
            v = cx.op("expand", v, shape=shape)
        comps.append(to_shape(cx, v, shape + [1]))
    stacked = comps[0] if k == 1 else cx.emit("concat", comps, {"axis": len(shape)})
    values = cast(cx, values, x.dtype)
    if values.type.rank != len(full) or not all(
            dims_equal(p, q) for p, q in zip(values.shape, full)):
        values = cx.op("expand", values, shape=full)
    reduction = "add" if a["accumulate"] else "none"
    return cx.op("scatter_nd", x, stacked, values, reduction=reduction)
