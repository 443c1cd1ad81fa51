"""ONNX lowerings of ``layer_norm`` and ``rms_norm`` (``transfuse/ir/opdefs/nn.py``).

Standard ops: ``LayerNormalization``, and RMSNorm as Pow / ReduceMean / Add / Sqrt / Div /
Mul, the pattern ORT fuses into SimplifiedLayerNormalization. ``attention`` is in
``attention.py``. Glossary: E normalized size.
"""

from __future__ import annotations

import torch
from onnx import helper

from transfuse.codegen.onnx.registry import LOWERINGS, out_dtype
from transfuse.codegen.onnx.tensors import onnx_dtype
from transfuse.ir.graph import Node, Value
from transfuse.ir.types import DType


def norm_weight(b, w: Value | None, offset: float, dtype: DType) -> str:
    """The scale a norm multiplies by: ``weight + offset`` (folded for a constant weight)."""
    if w is None:
        return ""
    name = b.cast(b.name(w), w.type.dtype, dtype)
    if not offset:
        return name
    if w.is_const:
        return b.derived(("offset", id(w), offset, dtype),
                         lambda: (w.const + offset).to(dtype.torch), f"{w.name}_plus")
    return b.add("Add", [name, b.const(offset, dtype, "offset")])


def layer_norm_std(b, x: str, node: Node, xv_type, w: Value | None, bias: Value | None,
                   eps: float, nd: int) -> str:
    dtype = xv_type.dtype
    if w is not None:
        scale = b.cast(b.name(w), w.type.dtype, dtype)
    else:
        norm_shape = xv_type.shape[xv_type.rank - nd:]
        if all(isinstance(d, int) for d in norm_shape):
            scale = b.const(torch.ones(norm_shape), dtype, "ones")
        else:
            shape = b.add("Shape", [x], start=xv_type.rank - nd)
            scale = b.add("ConstantOfShape", [shape], value=_one_tensor(dtype))
    ins = [x, scale] + ([b.cast(b.name(bias), bias.type.dtype, dtype)] if bias is not None
                        else [])
    return b.add("LayerNormalization", ins, axis=-nd, epsilon=eps)


def _one_tensor(dtype: DType):
    return helper.make_tensor("value", onnx_dtype(dtype), [1], [1.0])


@LOWERINGS.register("layer_norm")
def _layer_norm(b, node):
    x = node.inputs[0]
    w = node.inputs[1] if len(node.inputs) > 1 else None
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    return layer_norm_std(b, b.name(x), node, x.type, w, bias, node.attrs["eps"],
                          node.attrs["normalized_ndim"])


def rms_norm_std(b, x: str, x_dtype: DType, node: Node, w: Value | None) -> str:
    """x / sqrt(mean(x², last dims) + eps) [in f32 when upcast], cast back, times the weight.

    Written as Pow / ReduceMean / Add / Sqrt / Div / Mul, the pattern ORT fuses into
    SimplifiedLayerNormalization.
    """
    a = node.attrs
    upcast = a["upcast"] and x_dtype not in (DType.f32, DType.f64)
    cdt = DType.f32 if upcast else x_dtype
    h = b.cast(x, x_dtype, cdt)
    rank = node.outputs[0].type.rank
    axes = list(range(rank - a["normalized_ndim"], rank))
    ms = b.reduce("ReduceMean", b.add("Pow", [h, b.const(2.0, cdt, "two")]), axes, True)
    denom = b.add("Sqrt", [b.add("Add", [ms, b.const(a["eps"], cdt, "eps")])])
    h = b.cast(b.add("Div", [h, denom]), cdt, x_dtype)
    if w is None:
        return h
    dtype = out_dtype(node)
    scale = norm_weight(b, w, a["offset"], dtype)
    return b.add("Mul", [b.cast(h, x_dtype, dtype), scale])


@LOWERINGS.register("rms_norm")
def _rms_norm(b, node):
    x = node.inputs[0]
    w = node.inputs[1] if len(node.inputs) > 1 else None
    return rms_norm_std(b, b.name(x), x.type.dtype, node, w)
