"""aten indexing: slice/select/narrow, slice_scatter/select_scatter, index_select,
gather, and advanced ``index.Tensor`` (-> ``index``; boolean masks stay a torch fallback)."""

from __future__ import annotations

from typing import Any

from transfuse.frontend.aten.helpers import INT64_MAX, norm_axis
from transfuse.frontend.aten.registry import FALLBACK, aten
from transfuse.frontend.build import cast, to_shape
from transfuse.ir.graph import Value
from transfuse.ir.opdefs.indexing import INDEX_DTYPES
from transfuse.ir.types import dims_equal, normalize_dim


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
