"""Helpers shared by the ONNX converters: axes, reshapes of Known or IR values, shape
checks, index wrapping, filled tensors, transposed constant weights."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from transfuse.frontend.build import cast, sym_value, to_shape
from transfuse.frontend.onnx_ops.known import Known, is_concrete_shape, known, known_ints
from transfuse.frontend.onnx_ops.registry import INT64_MAX, OnnxNode
from transfuse.ir.graph import Value
from transfuse.ir.limits import oversize_reason
from transfuse.ir.types import DType, TensorType, dim_product, normalize_dim


def value_type(x: Any) -> TensorType:
    return x.type


def rank(x: Any) -> int:
    return len(x.shape)


def axis_of(cx, axis: int, r: int) -> int:
    if not -max(r, 1) <= axis < max(r, 1):
        raise cx.fail(f"axis {axis} is out of range for rank {r}")
    return axis % max(r, 1)



def reshaped(cx, x: Any, shape: Sequence) -> Any:
    """``x`` viewed as ``shape``: a Known stays Known (shape plumbing), a value gets a reshape."""
    if isinstance(x, Known) and is_concrete_shape(shape):
        return Known(x.data.reshape(list(shape)), x.dtype)
    return to_shape(cx, cx.value(x), shape)



def check_shape_values(cx, dims: Sequence) -> list:
    out = []
    for d in dims:
        if isinstance(d, int) and not 0 <= d <= INT64_MAX:
            raise cx.fail(f"shape {list(dims)} has dim {d} outside [0, 2**63 - 1]")
        out.append(normalize_dim(d))
    total = dim_product([d for d in out])
    if isinstance(total, int) and total > INT64_MAX:
        raise cx.fail(f"shape {list(dims)} has {total} elements, which overflows int64")
    return out


def dim_value(cx, d: Any) -> Value:
    """A dim (int or symbolic) as a 0-d i64 value."""
    return cx.const(d, DType.i64) if isinstance(d, int) else sym_value(cx, d, DType.i64)


def wrap_index(cx, idx: Any, size: Any) -> Value:
    """Indices that may be negative made non-negative: constants at capture, else remainder."""
    k = known(cx, idx)
    if k is not None and k.is_concrete:
        vals = k.tensor().long()
        if isinstance(size, int):
            if ((vals < -size) | (vals >= size)).any():
                raise cx.fail(f"index out of range for a dim of size {size}")
            return cx.add_weight(torch.where(vals < 0, vals + size, vals).to(k.dtype.torch), "idx")
        if bool((vals >= 0).all()):
            return cx.value(idx)
    v = cx.value(idx)
    return cx.op("remainder", v, cast(cx, dim_value(cx, size), v.dtype))


def full_value(cx, shape: list, fill: Any, dtype: DType) -> Value:
    if not dtype.is_float and isinstance(fill, int) and abs(fill) > 2**53:
        v = cx.const(fill, dtype)
        return v if not shape else cx.op("expand", v, shape=list(shape))
    return cx.op("full", shape=list(shape), value=float(fill), dtype=dtype)


def axes_arg(cx, node: OnnxNode, i: int) -> list[int] | None:
    """Axes from input ``i`` (newer opsets) or the ``axes`` attribute; None when absent."""
    if node.has_input(i):
        axes = known_ints(cx, node, i, "axes")
        if not all(isinstance(a, int) for a in axes):
            raise cx.fail(f"axes {axes} must be static")
        return axes
    a = node.attr("axes")
    return None if a is None else list(a)


def weight_t(cx, w: Value) -> Value:
    """A 2-D constant [K, N] as the [N, K] weight ``linear`` takes, made once per constant."""
    key = ("weight_t", id(w))
    if key not in cx.cache:
        cx.cache[key] = cx.add_weight(w.const.t().contiguous(), f"{w.name}_t")
    return cx.cache[key]


def check_constant_size(cx, shape: Sequence, dtype: DType, what: str) -> None:
    """Refuse, before anything is allocated, a tensor the frontend would make of a static
    ``shape`` (a Range, a constant filled or broadcast to a shape, an index table) above the
    limit of :mod:`transfuse.ir.limits`: a CaptureError naming the node and the bytes."""
    if not is_concrete_shape(shape):
        return
    reason = oversize_reason(math.prod(shape), dtype)
    if reason is not None:
        raise cx.fail(f"{what}: {reason}")
