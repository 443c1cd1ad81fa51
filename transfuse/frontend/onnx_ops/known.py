"""Known values: tensors whose contents are known at capture (shape plumbing), and
turning them into IR values (constants, or ``shape_of`` arithmetic)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import sympy
import torch

from transfuse.frontend.build import sym_value
from transfuse.frontend.onnx_ops.registry import OnnxNode
from transfuse.ir.graph import Value
from transfuse.ir.types import DType, TensorType

KNOWN_MAX = 1024  # elements of a Known value (shape plumbing stays small)

def _elem(x: Any, dtype: DType) -> Any:
    """One element of a Known, as the dtype holds it: python int/float/bool, or sympy."""
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, sympy.logic.boolalg.BooleanAtom):
        x = bool(x)
    if dtype == DType.bool:
        if isinstance(x, sympy.Basic):
            if x.is_Number:
                return bool(x != 0)
            if isinstance(x, sympy.Expr) and x.is_positive:
                return True
            return x  # an undecided relation
        return bool(x)
    if dtype.is_float:
        if isinstance(x, sympy.Basic):
            return float(x) if x.is_Number else x
        return float(x)
    if isinstance(x, sympy.Basic) and not isinstance(x, sympy.Expr):
        return x  # an undecided relation cast to int: stays undecided
    if isinstance(x, sympy.Basic):
        if x.is_Number:
            return int(x)
        e = sympy.expand(x)
        return int(e) if e.is_Integer else e
    if isinstance(x, float):
        if not math.isfinite(x):
            raise ValueError(f"cannot hold {x} in an integer type")
        return int(x)
    return int(x)


def vec_map(fn: Callable, *arrays: np.ndarray) -> np.ndarray:
    arrays = np.broadcast_arrays(*[np.asarray(a, dtype=object) for a in arrays])
    out = np.empty(arrays[0].shape, dtype=object)
    for idx in np.ndindex(out.shape):
        out[idx] = fn(*(a[idx] for a in arrays))
    return out


def obj_array(data: Any) -> np.ndarray:
    if isinstance(data, np.ndarray):
        return data.astype(object)
    arr = np.empty((), dtype=object) if not isinstance(data, (list, tuple)) else None
    if arr is not None:
        arr[()] = data
        return arr
    return np.array(data, dtype=object)


class Known:
    """A tensor whose contents are known at capture: ints, floats, bools or sympy dims."""

    __slots__ = ("data", "dtype")

    def __init__(self, data: Any, dtype: DType):
        self.dtype = dtype
        self.data = vec_map(lambda e: _elem(e, dtype), obj_array(data))

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> Known:
        dtype = DType.from_torch(t.dtype)
        if dtype in (DType.bf16, DType.f8e4m3, DType.f8e5m2, DType.f16):
            t = t.float()
        return cls(np.array(t.tolist(), dtype=object) if t.dim() else t.item(), dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def type(self) -> TensorType:
        return TensorType(self.dtype, self.shape)

    def elements(self) -> list:
        return list(self.data.reshape(-1))

    @property
    def is_concrete(self) -> bool:
        return not any(isinstance(e, sympy.Basic) for e in self.elements())

    def tensor(self) -> torch.Tensor:
        return torch.tensor(self.data.tolist(), dtype=self.dtype.torch)

    def __repr__(self) -> str:
        return f"Known({self.data.tolist()!r}, {self.dtype})"


def known(cx, x: Any) -> Known | None:
    """``x`` as a Known when its contents are known at capture (small constants included)."""
    if isinstance(x, Known):
        return x
    if isinstance(x, Value) and x.is_const and x.const.numel() <= KNOWN_MAX:
        key = ("known", id(x))
        if key not in cx.cache:
            cx.cache[key] = Known.from_tensor(x.const)
        return cx.cache[key]
    return None


def materialize(cx, k: Known) -> Value:
    """A Known as an IR value: a constant, or shape arithmetic from ``shape_of``."""
    key = ("materialized", k.dtype, k.shape, repr(k.data.tolist()))
    if key in cx.cache:
        return cx.cache[key]
    if k.is_concrete:
        try:
            t = k.tensor()
        except (OverflowError, RuntimeError) as e:
            raise cx.fail(f"the value {k.data.tolist()} does not fit {k.dtype}: {e}") from None
        v = cx.add_weight(t, "c")
    else:
        parts = []
        for e in k.elements():
            if isinstance(e, sympy.Basic):
                if not isinstance(e, sympy.Expr):
                    raise cx.fail(f"a value depends on the undecided condition {e}")
                parts.append(sym_value(cx, e, k.dtype))
            else:
                parts.append(cx.const(e, k.dtype))
        if not k.shape:
            v = parts[0]
        else:
            parts = [cx.op("reshape", p, shape=[1]) for p in parts]
            v = parts[0] if len(parts) == 1 else cx.emit("concat", parts, {"axis": 0})
            if len(k.shape) != 1:
                v = cx.op("reshape", v, shape=list(k.shape))
    cx.cache[key] = v
    return v


def known_ints(cx, node: OnnxNode, i: int, what: str) -> list:
    """Input ``i`` as a list of ints / sympy dims (0-d or 1-D Known), or a CaptureError."""
    k = known(cx, node.input(i))
    if k is None:
        raise cx.fail(f"its {what} (input {i}, {node.inputs[i]!r}) is not known at capture: it "
                      "depends on tensor values, not only on shapes, so transfuse cannot put it "
                      "in the graph's shapes")
    if k.dtype.is_float or k.dtype == DType.bool or len(k.shape) > 1:
        raise cx.fail(f"its {what} must be a 0-d or 1-D integer tensor, got {k.type}")
    for e in k.elements():
        if isinstance(e, sympy.Basic) and not isinstance(e, sympy.Expr):
            raise cx.fail(f"its {what} depends on the undecided condition {e}")
    return k.elements()


def known_scalar(cx, node: OnnxNode, i: int, what: str) -> Any:
    k = known(cx, node.input(i))
    if k is None or len(k.elements()) != 1:
        raise cx.fail(f"its {what} (input {i}) must be a single value known at capture")
    return k.elements()[0]


def all_known(cx, node: OnnxNode) -> list[Known | None] | None:
    ks = []
    for i in range(len(node.inputs)):
        if not node.has_input(i):
            ks.append(None)
            continue
        k = known(cx, node.input(i))
        if k is None:
            return None
        ks.append(k)
    return ks


def is_concrete_shape(shape: Sequence) -> bool:
    return all(isinstance(d, int) for d in shape)

def sym_max(a, b):
    if isinstance(a, sympy.Basic) or isinstance(b, sympy.Basic):
        return sympy.Max(a, b)
    return max(a, b)


def sym_min(a, b):
    if isinstance(a, sympy.Basic) or isinstance(b, sympy.Basic):
        return sympy.Min(a, b)
    return min(a, b)


def tensor_result(cx, t: torch.Tensor, hint: str) -> Any:
    if t.numel() <= KNOWN_MAX:
        return Known.from_tensor(t)
    return cx.add_weight(t, hint)
