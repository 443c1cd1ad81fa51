"""The onnxruntime backend's lowering registry and the helpers its lowerings share.

A lowering turns one node into ONNX nodes through the
:class:`~transfuse.codegen.onnx.builder.OnnxBuilder` and returns the ONNX name of each
output. It is registered on :data:`LOWERINGS` (the generic registry of
``codegen/lowering.py``) with ``@LOWERINGS.register("op", supports=...)`` in the file of
its op family (``elementwise.py``, ``linalg.py``, ``misc.py``, ``reduce.py``, ``shape.py``,
``nn.py``, ``fused.py``, ``attention.py``; the package ``__init__`` imports them all).
``supports(node)`` returns a reason when the op cannot be expressed in ONNX, and the
backend raises a :class:`LoweringError` naming the node and that reason (ONNX has no
fallback into PyTorch).

Types: IR ops follow torch's promotion rules, ONNX ops want equal input types, so every
lowering casts its inputs to the type the IR node computes in (:func:`inputs_as`).
Fused com.microsoft operators are used for f32 only (:func:`fusable`; ORT's CPU kernels
compute these in f32 anyway).
"""

from __future__ import annotations

from transfuse.codegen.lowering import Lowerings
from transfuse.ir.graph import Node, Value
from transfuse.ir.types import DType, result_dtype

#: every onnxruntime lowering, by IR op
LOWERINGS = Lowerings("onnxruntime")


def out_dtype(node: Node, i: int = 0) -> DType:
    """The dtype of ``node``'s ``i``-th output."""
    return node.outputs[i].type.dtype


def inputs_as(b, node: Node, dtype: DType, indices=None) -> list[str]:
    """``node``'s inputs (those at ``indices``, default all) cast to ``dtype``."""
    idx = range(len(node.inputs)) if indices is None else indices
    return [b.input(node, i, dtype) for i in idx]


def common_dtype(node: Node, indices=(0, 1)) -> DType:
    """The promoted dtype of ``node``'s inputs at ``indices``."""
    return result_dtype(*(node.inputs[i].type for i in indices))


_FUSED_DTYPES = (DType.f32,)


def fusable(b, node: Node) -> bool:
    """Whether ``node`` may use com.microsoft ops: a fused export and f32 values."""
    return b.fused and out_dtype(node) in _FUSED_DTYPES and all(
        v is None or v.type.dtype in _FUSED_DTYPES or not v.type.dtype.is_float
        for v in node.inputs)


def producer(v: Value | None, op: str) -> Node | None:
    """The node that makes ``v`` when its op is ``op``, else None."""
    if v is None or v.producer is None or v.producer.op != op:
        return None
    return v.producer


__all__ = ["LOWERINGS", "out_dtype", "inputs_as", "common_dtype", "fusable", "producer"]
