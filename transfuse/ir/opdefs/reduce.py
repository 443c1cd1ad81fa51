"""Reductions over axes, softmax family and cumulative sums."""

from __future__ import annotations

import torch

from transfuse.ir.opdef import Attr, default_bytes, register
from transfuse.ir.opdefs._util import in_type, norm_axis
from transfuse.ir.types import DType, TensorType


def _axes(node) -> tuple[int, ...]:
    rank = in_type(node, 0).rank
    axes = node.attrs["axes"]
    if not axes:  # empty = all axes
        return tuple(range(rank))
    return tuple(sorted(norm_axis(a, rank, node.op) for a in axes))


def _infer_reduce(node, dtype=None):
    t = in_type(node, 0)
    axes = _axes(node)
    if node.attrs["keepdim"]:
        shape = [1 if i in axes else d for i, d in enumerate(t.shape)]
    else:
        shape = [d for i, d in enumerate(t.shape) if i not in axes]
    return [TensorType(dtype or t.dtype, shape)]


def _cost_reduce(node):
    return in_type(node, 0).numel(), default_bytes(node)


_REDUCE_ATTRS = {"axes": Attr("ints", ()), "keepdim": Attr("bool", False)}


def _verify_reduce(node):
    try:
        _axes(node)
    except Exception as e:  # noqa: BLE001 - reason string for verify
        return str(e)
    return None


@register("reduce_sum", ["x"], _REDUCE_ATTRS, infer=_infer_reduce, verify=_verify_reduce,
          cost=_cost_reduce)
def reduce_sum(xs, attrs, env):
    axes = attrs["axes"] or tuple(range(xs[0].dim()))
    return torch.sum(xs[0], dim=axes, keepdim=attrs["keepdim"])


@register("reduce_mean", ["x"], _REDUCE_ATTRS, infer=_infer_reduce, verify=_verify_reduce,
          cost=_cost_reduce)
def reduce_mean(xs, attrs, env):
    axes = attrs["axes"] or tuple(range(xs[0].dim()))
    return torch.mean(xs[0], dim=axes, keepdim=attrs["keepdim"])


@register("reduce_max", ["x"], _REDUCE_ATTRS, infer=_infer_reduce, verify=_verify_reduce,
          cost=_cost_reduce)
def reduce_max(xs, attrs, env):
    axes = attrs["axes"] or tuple(range(xs[0].dim()))
    return torch.amax(xs[0], dim=axes, keepdim=attrs["keepdim"])


@register("reduce_min", ["x"], _REDUCE_ATTRS, infer=_infer_reduce, verify=_verify_reduce,
          cost=_cost_reduce)
def reduce_min(xs, attrs, env):
    axes = attrs["axes"] or tuple(range(xs[0].dim()))
    return torch.amin(xs[0], dim=axes, keepdim=attrs["keepdim"])


def _infer_arg(node):
    t = in_type(node, 0)
    axis = norm_axis(node.attrs["axis"], t.rank, node.op)
    if node.attrs["keepdim"]:
        shape = [1 if i == axis else d for i, d in enumerate(t.shape)]
    else:
        shape = [d for i, d in enumerate(t.shape) if i != axis]
    return [TensorType(DType.i64, shape)]


@register("argmax", ["x"], {"axis": Attr("int"), "keepdim": Attr("bool", False)},
          infer=_infer_arg, cost=_cost_reduce)
def argmax(xs, attrs, env):
    return torch.argmax(xs[0], dim=attrs["axis"], keepdim=attrs["keepdim"])


def _infer_axis_same(node):
    t = in_type(node, 0)
    norm_axis(node.attrs["axis"], t.rank, node.op)
    return [t]


def _cost_softmax(node):
    return 5 * in_type(node, 0).numel(), default_bytes(node)


@register("softmax", ["x"], {"axis": Attr("int", -1)}, infer=_infer_axis_same, cost=_cost_softmax)
def softmax(xs, attrs, env):
    return torch.softmax(xs[0], dim=attrs["axis"])


@register("log_softmax", ["x"], {"axis": Attr("int", -1)}, infer=_infer_axis_same,
          cost=_cost_softmax)
def log_softmax(xs, attrs, env):
    return torch.log_softmax(xs[0], dim=attrs["axis"])


def _infer_cumsum(node):
    t = in_type(node, 0)
    norm_axis(node.attrs["axis"], t.rank, node.op)
    dtype = t.dtype if t.dtype.is_float or t.dtype == DType.i64 else DType.i64
    return [t.with_dtype(node.attrs["dtype"] or dtype)]


@register("cumsum", ["x"], {"axis": Attr("int"), "dtype": Attr("dtype?", None)},
          infer=_infer_cumsum, cost=_cost_reduce)
def cumsum(xs, attrs, env):
    dtype = attrs["dtype"].torch if attrs["dtype"] else None
    return torch.cumsum(xs[0], dim=attrs["axis"], dtype=dtype)
