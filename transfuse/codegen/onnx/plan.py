"""Decisions of the onnxruntime backend that span two nodes, made before lowering.

- a linear whose output only feeds a ``slice`` keeping its first N columns computes just
  those (``layout.pad-gemm-columns`` pads wide GEMMs for PyTorch's kernels; ORT's are
  faster unpadded and its Slice would copy the logits): recorded in ``b.narrowed``;
- an ``add_norm`` lowered to Skip(Simplified)LayerNormalization absorbs the bias of a
  linear that only feeds it: recorded in ``b.folded_bias``.
"""

from __future__ import annotations

from transfuse.codegen.onnx.builder import OnnxBuilder
from transfuse.codegen.onnx.fused import add_norm_refuses
from transfuse.codegen.onnx.registry import producer
from transfuse.ir.graph import Node


def plan(b: OnnxBuilder) -> None:
    """Before lowering: decisions that look at a node and its users.

    - a linear whose output only feeds a ``slice`` keeping its first N columns computes just
      those (``layout.pad-gemm-columns`` pads wide GEMMs for PyTorch's kernels; ORT's are
      faster unpadded and its Slice would copy the logits);
    - an add_norm absorbs the bias of a linear that only feeds it.
    """
    for node in b.graph.nodes:
        cut = narrowing_slice(node)
        if cut is not None:
            b.narrowed[id(node)] = cut
    for node in b.graph.nodes:
        if node.op != "add_norm" or add_norm_refuses(b, node) is not None:
            continue
        for v in node.inputs[:2]:
            lin = producer(v, "linear")
            if (lin is not None and len(lin.inputs) > 2 and lin.inputs[2] is not None
                    and lin.attrs["activation"] is None and v.num_uses == 1
                    and v.type == node.outputs[0].type):
                b.folded_bias.add(id(lin))
                break


def narrowing_slice(node: Node):
    """The end N when ``node`` is a linear with constant weight (and bias) whose only user is a
    slice of the last axis from 0 to a static N with step 1."""
    if node.op != "linear" or not node.inputs[1].is_const:
        return None
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    out = node.outputs[0]
    if (bias is not None and not bias.is_const) or out.num_uses != 1 or len(out.uses) != 1:
        return None
    user = out.uses[0][0]
    a = user.attrs if user.op == "slice" else None
    if a is None or a["axis"] % out.type.rank != out.type.rank - 1 or a["start"] != 0 \
            or a["step"] != 1 or not isinstance(a["end"], int):
        return None
    n = out.type.shape[-1]
    return a["end"] if isinstance(n, int) and 0 < a["end"] < n else None


__all__ = ["plan", "narrowing_slice"]
