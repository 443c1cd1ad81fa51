"""ONNX lowerings of the reductions, softmax and cumsum (``transfuse/ir/opdefs/reduce.py``).
"""

from __future__ import annotations

from transfuse.codegen.onnx.registry import LOWERINGS, out_dtype
from transfuse.ir.types import DType

_REDUCE = {"reduce_sum": "ReduceSum", "reduce_mean": "ReduceMean", "reduce_max": "ReduceMax",
           "reduce_min": "ReduceMin"}


def _reduce(op_type: str):
    def lower(b, node):
        axes = node.attrs["axes"] or None
        x = b.input(node, 0, out_dtype(node))
        if axes is None and node.inputs[0].type.rank == 0:
            return x
        return b.reduce(op_type, x, axes, node.attrs["keepdim"])

    return lower


for _op, _t in _REDUCE.items():
    LOWERINGS.register(_op)(_reduce(_t))


@LOWERINGS.register("argmax")
def _argmax(b, node):
    return b.add("ArgMax", [b.input(node, 0)], axis=node.attrs["axis"],
                 keepdims=int(node.attrs["keepdim"]))


@LOWERINGS.register("softmax", "log_softmax")
def _softmax(b, node):
    op_type = "Softmax" if node.op == "softmax" else "LogSoftmax"
    return b.add(op_type, [b.input(node, 0)], axis=node.attrs["axis"])


@LOWERINGS.register("cumsum")
def _cumsum(b, node):
    return b.add("CumSum", [b.input(node, 0, out_dtype(node)),
                            b.const(node.attrs["axis"], DType.i64, "axis")])
