"""ONNX Cast/CastLike, Identity, Dropout (inference only)."""

from __future__ import annotations

from transfuse.frontend.build import cast
from transfuse.frontend.onnx_external import dtype_of
from transfuse.frontend.onnx_ops.known import Known, known
from transfuse.frontend.onnx_ops.registry import onnx_op
from transfuse.ir.types import DType


def _cast_to(cx, node, x, dtype: DType):
    k = known(cx, x)
    if isinstance(x, Known) or (k is not None and k.data.size <= 64 and not dtype.is_float
                                and not k.dtype.is_float):
        try:
            return Known(k.data, dtype)
        except (ValueError, TypeError):
            pass
    return cast(cx, cx.value(x), dtype)


@onnx_op("Cast")
def _cast(cx, node):
    to = node.attr("to")
    return [_cast_to(cx, node, node.input(0), dtype_of(to, f"the target type of {cx.where()}"))]


@onnx_op("CastLike")
def _castlike(cx, node):
    return [_cast_to(cx, node, node.input(0), node.input(1).dtype)]


@onnx_op("Identity")
def _identity(cx, node):
    return [node.input(0)]


@onnx_op("Dropout")
def _dropout(cx, node):
    if node.has_input(2):
        training = known(cx, node.input(2))
        if training is None or any(training.elements()):
            raise cx.fail("Dropout in training mode is random; export the model in eval mode")
    x = node.input(0)
    outs = [x]
    if node.used(1):
        outs.append(cx.op("full", shape=list(x.shape), value=1.0, dtype=DType.bool))
    return outs
