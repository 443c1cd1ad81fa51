"""ONNX tensor creation: Constant, ConstantOfShape, Range (-> ``arange``), Trilu, CumSum."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import sympy
import torch

from transfuse.frontend.onnx_external import tensor_from_proto
from transfuse.frontend.onnx_ops.helpers import (
    axis_of,
    check_constant_size,
    check_shape_values,
    full_value,
)
from transfuse.frontend.onnx_ops.known import (
    KNOWN_MAX,
    Known,
    is_concrete_shape,
    known_ints,
    known_scalar,
    tensor_result,
)
from transfuse.frontend.onnx_ops.registry import onnx_op
from transfuse.ir.types import DType, normalize_dim


@onnx_op("Constant")
def _constant(cx, node):
    a = node.attrs
    if "value" in a:
        t = tensor_from_proto(a["value"], cx.base_dir, cx.budget)
    elif "value_float" in a:
        t = torch.tensor(a["value_float"], dtype=torch.float32)
    elif "value_floats" in a:
        t = torch.tensor(list(a["value_floats"]), dtype=torch.float32)
    elif "value_int" in a:
        t = torch.tensor(a["value_int"], dtype=torch.int64)
    elif "value_ints" in a:
        t = torch.tensor(list(a["value_ints"]), dtype=torch.int64)
    else:
        raise cx.unsupported(f"a Constant with {sorted(a)} (strings and sparse tensors are not "
                             "supported)")
    return [tensor_result(cx, t, node.outputs[0])]


@onnx_op("ConstantOfShape")
def _constant_of_shape(cx, node):
    shape = check_shape_values(cx, known_ints(cx, node, 0, "shape"))
    value = node.attr("value")
    if value is not None:
        t = tensor_from_proto(value, cx.base_dir, cx.budget)
        if t.numel() != 1:
            raise cx.fail(f"value must hold one element, got {t.numel()}")
        dtype, fill = DType.from_torch(t.dtype), t.reshape(()).item()
    else:
        dtype, fill = DType.f32, 0.0
    check_constant_size(cx, shape, dtype, f"a constant of shape {shape}")
    if is_concrete_shape(shape) and math.prod(shape) <= KNOWN_MAX:
        return [Known(np.full(shape, fill, dtype=object) if shape else fill, dtype)]
    return [full_value(cx, shape, fill, dtype)]



@onnx_op("Range")
def _range(cx, node):
    start = known_scalar(cx, node, 0, "start")
    limit = known_scalar(cx, node, 1, "limit")
    delta = known_scalar(cx, node, 2, "delta")
    dtype = node.input(0).dtype
    values = (start, limit, delta)
    if all(not isinstance(v, sympy.Basic) for v in values):
        if delta == 0:
            raise cx.fail("delta is 0")
        check_constant_size(cx, [_range_length(cx, start, limit, delta)], dtype,
                            f"Range({start}, {limit}, {delta})")
        t = torch.arange(start, limit, delta, dtype=torch.float64 if dtype.is_float
                         else torch.int64).to(dtype.torch)
        return [tensor_result(cx, t, "range")]
    as_int = [int(v) if isinstance(v, float) and v.is_integer() else v for v in values]
    if not isinstance(as_int[2], int) or as_int[2] <= 0 or any(isinstance(v, float)
                                                               for v in as_int):
        raise cx.fail(f"Range({start}, {limit}, {delta}) over a symbolic size needs integral "
                      "bounds and a positive static step")
    return [cx.op("arange", start=as_int[0], end=as_int[1], step=as_int[2], dtype=dtype)]


def _range_length(cx, start: Any, limit: Any, delta: Any) -> int:
    """Elements of Range(start, limit, delta): max(ceil((limit - start) / delta), 0)."""
    if all(isinstance(v, int) for v in (start, limit, delta)):
        return max(-((start - limit) // delta), 0)
    span = (limit - start) / delta
    if not math.isfinite(span):
        raise cx.fail(f"Range({start}, {limit}, {delta}) has no finite length")
    return max(math.ceil(span), 0)


@onnx_op("Trilu")
def _trilu(cx, node):
    k = known_scalar(cx, node, 1, "diagonal k") if node.has_input(1) else 0
    if not isinstance(k, int):
        raise cx.fail(f"diagonal {k} must be static")
    op = "triu" if node.attr("upper", 1) else "tril"
    return [cx.op(op, cx.value(node.input(0)), diagonal=k)]


@onnx_op("CumSum")
def _cumsum(cx, node):
    v = cx.value(node.input(0))
    axis = axis_of(cx, known_scalar(cx, node, 1, "axis"), v.type.rank)
    size = v.shape[axis]
    if node.attr("reverse", 0):
        if not isinstance(size, int):
            raise cx.unsupported("CumSum with reverse=1 over a symbolic dim")
        check_constant_size(cx, [size], DType.i64, "the reversing index of CumSum")
        rev = cx.add_weight(torch.arange(size - 1, -1, -1, dtype=torch.int64), "rev")
        v = cx.op("index_select", v, rev, axis=axis)
    x = v
    if node.attr("exclusive", 0):  # shift right by one: [0, x_0, .., x_{n-2}]
        shape = list(v.shape)
        shape[axis] = 1
        zero = cx.op("full", shape=shape, value=0.0, dtype=v.dtype)
        if not (isinstance(size, int) and size <= 1):
            head = cx.op("slice", v, axis=axis, start=0, end=normalize_dim(size - 1), step=1)
            x = cx.emit("concat", [zero, head], {"axis": axis})
        else:
            x = zero if isinstance(size, int) and size == 1 else v
    out = cx.op("cumsum", x, axis=axis, dtype=v.dtype)
    if node.attr("reverse", 0):
        out = cx.op("index_select", out, rev, axis=axis)
    return [out]
