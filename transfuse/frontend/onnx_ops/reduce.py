"""ONNX reductions, ArgMax/ArgMin, Softmax/LogSoftmax."""

from __future__ import annotations

import math
from functools import reduce

import numpy as np
import torch

from transfuse.frontend.onnx_ops.helpers import (
    axes_arg,
    axis_of,
    check_constant_size,
    full_value,
    rank,
)
from transfuse.frontend.onnx_ops.known import Known, known, sym_max, sym_min
from transfuse.frontend.onnx_ops.registry import onnx_op
from transfuse.ir.graph import Value
from transfuse.ir.types import DType

REDUCE = {"ReduceSum": "reduce_sum", "ReduceMean": "reduce_mean", "ReduceMax": "reduce_max",
          "ReduceMin": "reduce_min", "ReduceProd": None}
_REDUCE_KNOWN = {"ReduceSum": lambda a, b: a + b, "ReduceMax": sym_max, "ReduceMin": sym_min,
                 "ReduceProd": lambda a, b: a * b}


@onnx_op(*REDUCE)
def _reduce(cx, node):
    x = node.input(0)
    r = rank(x)
    axes = axes_arg(cx, node, 1)
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
    return full_value(cx, shape, fill, dt)


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
    check_constant_size(cx, [n], DType.i64, f"the reversing index of {node.op_type}")
    rev = cx.add_weight(torch.arange(n - 1, -1, -1, dtype=torch.int64), "rev")
    idx = cx.op("argmax", cx.op("index_select", v, rev, axis=axis), axis=axis, keepdim=keep)
    return [cx.op("sub", cx.const(n - 1, DType.i64), idx)]


@onnx_op("Softmax", "LogSoftmax")
def _softmax(cx, node):
    v = cx.value(node.input(0))
    axis = axis_of(cx, node.attr("axis", -1), v.type.rank)
    return [cx.op("softmax" if node.op_type == "Softmax" else "log_softmax", v, axis=axis)]
