"""Helpers shared by the aten converters: axes, scalar operands in torch's dtype,
the node's result filled with a value, which outputs of a node are read."""

from __future__ import annotations

from typing import Any

import sympy
import torch
import torch.fx as fx

from transfuse.errors import CaptureError
from transfuse.frontend.build import cast, sym_value
from transfuse.ir.graph import Value
from transfuse.ir.types import DType

INT64_MAX = 2**63 - 1


def norm_axis(d: int, rank: int) -> int:
    if not -max(rank, 1) <= d < max(rank, 1):
        raise CaptureError(f"dim {d} out of range for rank {rank}")
    return d % max(rank, 1)


def args_list(a: dict) -> list:
    return list(a.values())


def is_tensor_arg(cx, x) -> bool:
    return isinstance(x, fx.Node) and isinstance(cx.lookup(x), Value)


def _scalar_dtype(ref: DType, s: Any) -> DType:
    """The dtype torch gives python scalar ``s`` next to a tensor of dtype ``ref``."""
    probe = 1 if isinstance(s, sympy.Basic) else s
    return DType.from_torch(torch.result_type(torch.empty(1, dtype=ref.torch), probe))


def operand(cx, x: Any, ref: DType) -> Value:
    """A tensor argument's value, or a python/symbolic scalar as a 0-d constant."""
    if is_tensor_arg(cx, x):
        return cx.value(x)
    s = cx.scalar(x)
    dtype = _scalar_dtype(ref, s)
    if isinstance(s, sympy.Basic):
        return sym_value(cx, s, dtype)
    return cx.const(s, dtype)


def operands(cx, x: Any, y: Any) -> tuple[Value, Value]:
    if is_tensor_arg(cx, x):
        vx = cx.value(x)
        return vx, operand(cx, y, vx.dtype)
    if is_tensor_arg(cx, y):
        vy = cx.value(y)
        return operand(cx, x, vy.dtype), vy
    want = cx.out_type().dtype
    return operand(cx, x, want), operand(cx, y, want)


def full_result(cx, value: Any) -> Value:
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


def uses_outputs(n: fx.Node, indices: set[int]) -> bool:
    """Whether any getitem user of a multi-output node reads one of ``indices``."""
    for u in n.users:
        if getattr(u.target, "__name__", "") != "getitem":
            return True
        if u.args[1] in indices and u.users:
            return True
    return False


def permute_value(cx, x: Value, perm: list[int]) -> Value:
    if perm == list(range(len(perm))):
        return x
    return cx.op("permute", x, perm=perm)


def norm_axes(dims: Any, rank: int) -> tuple[int, ...]:
    if dims is None:
        return ()
    if isinstance(dims, int):
        dims = [dims]
    return tuple(sorted(norm_axis(d, rank) for d in dims))
