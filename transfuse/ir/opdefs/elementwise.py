"""Elementwise ops: binary arithmetic and comparisons (numpy broadcasting,
torch type promotion), unary math, activations, casts, where and clamp."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from transfuse.ir.opdef import Attr, default_bytes, register
from transfuse.ir.opdefs._util import broadcast, in_type, result_dtype
from transfuse.ir.types import DType, TensorType


def _cost_elementwise(node):
    return node.outputs[0].type.numel(), default_bytes(node)


def _infer_binary(node):
    return [TensorType(result_dtype(in_type(node, 0), in_type(node, 1)), broadcast(node))]


def _infer_compare(node):
    broadcast(node)
    return [TensorType(DType.bool, broadcast(node))]


def _infer_same(node):
    return [in_type(node, 0)]


def _infer_float_unary(node):
    t = in_type(node, 0)
    if t.dtype.is_float:
        return [t]
    return [t.with_dtype(DType.f32)]  # torch promotes integer inputs of float functions to f32


BINARY = {
    "add": torch.add,
    "sub": torch.sub,
    "mul": torch.mul,
    "div": torch.div,
    "pow": torch.pow,
    "maximum": torch.maximum,
    "minimum": torch.minimum,
    "floor_div": lambda a, b: torch.div(a, b, rounding_mode="floor"),
    "remainder": torch.remainder,
}
COMPARE = {
    "eq": torch.eq,
    "ne": torch.ne,
    "lt": torch.lt,
    "le": torch.le,
    "gt": torch.gt,
    "ge": torch.ge,
    "logical_and": torch.logical_and,
    "logical_or": torch.logical_or,
    "logical_xor": torch.logical_xor,
}
UNARY_FLOAT = {
    "exp": torch.exp,
    "log": torch.log,
    "sqrt": torch.sqrt,
    "rsqrt": torch.rsqrt,
    "reciprocal": torch.reciprocal,
    "tanh": torch.tanh,
    "erf": torch.erf,
    "sigmoid": torch.sigmoid,
    "sin": torch.sin,
    "cos": torch.cos,
    "silu": lambda x: F.silu(x if x.is_floating_point() else x.float()),  # no int kernel
}
UNARY_SAME = {
    "neg": torch.neg,
    "abs": torch.abs,
    "relu": torch.relu,
    "floor": torch.floor,
    "ceil": torch.ceil,
    "sign": torch.sign,
}


def _binary(fn):
    return lambda xs, attrs, env: fn(xs[0], xs[1])


def _unary(fn):
    return lambda xs, attrs, env: fn(xs[0])


def _infer_true_div(node):
    """True division: integer operands give the default float type, as in torch."""
    t = _infer_binary(node)[0]
    return [t if t.dtype.is_float else t.with_dtype(DType.f32)]


for _name, _fn in BINARY.items():
    infer = _infer_true_div if _name == "div" else _infer_binary
    register(_name, ["a", "b"], infer=infer, cost=_cost_elementwise)(_binary(_fn))
for _name, _fn in COMPARE.items():
    register(_name, ["a", "b"], infer=_infer_compare, cost=_cost_elementwise)(_binary(_fn))
for _name, _fn in UNARY_FLOAT.items():
    register(_name, ["x"], infer=_infer_float_unary, cost=_cost_elementwise)(_unary(_fn))
for _name, _fn in UNARY_SAME.items():
    register(_name, ["x"], infer=_infer_same, cost=_cost_elementwise)(_unary(_fn))


@register("logical_not", ["x"], infer=lambda n: [in_type(n, 0).with_dtype(DType.bool)],
          cost=_cost_elementwise)
def logical_not(xs, attrs, env):
    return torch.logical_not(xs[0])


def _verify_gelu(node):
    if node.attrs["approximate"] not in ("none", "tanh"):
        return f"gelu approximate must be 'none' or 'tanh', got {node.attrs['approximate']!r}"
    return None


@register("gelu", ["x"], {"approximate": Attr("str", "none")}, infer=_infer_float_unary,
          verify=_verify_gelu, cost=_cost_elementwise)
def gelu(xs, attrs, env):
    """GELU; ``approximate`` is "none" (erf) or "tanh" and is never swapped."""
    return F.gelu(xs[0], approximate=attrs["approximate"])


@register("cast", ["x"], {"dtype": Attr("dtype")},
          infer=lambda n: [in_type(n, 0).with_dtype(n.attrs["dtype"])], cost=_cost_elementwise)
def cast(xs, attrs, env):
    return xs[0].to(attrs["dtype"].torch)


def _infer_where(node):
    dtype = result_dtype(in_type(node, 1), in_type(node, 2))
    return [TensorType(dtype, broadcast(node))]


def _verify_where(node):
    if in_type(node, 0).dtype != DType.bool:
        return f"where condition must be bool, got {in_type(node, 0).dtype}"
    return None


@register("where", ["cond", "a", "b"], infer=_infer_where, verify=_verify_where,
          cost=_cost_elementwise)
def where(xs, attrs, env):
    return torch.where(xs[0], xs[1], xs[2])


@register("clamp", ["x"], {"min": Attr("float?", None), "max": Attr("float?", None)},
          infer=_infer_same, cost=_cost_elementwise)
def clamp(xs, attrs, env):
    lo, hi = attrs["min"], attrs["max"]
    if not xs[0].is_floating_point():  # keep the integer dtype: integral bounds, rounded inward
        lo = None if lo is None else math.ceil(lo)
        hi = None if hi is None else math.floor(hi)
    return torch.clamp(xs[0], lo, hi)
