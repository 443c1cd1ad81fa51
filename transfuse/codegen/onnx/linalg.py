"""ONNX lowerings of ``matmul`` and ``linear`` (``transfuse/ir/opdefs/linalg.py``).

``linear`` -> ``FusedMatMul`` (transB: the torch-layout weight, not copied) with its
activation fused where exact (:func:`~transfuse.codegen.onnx.elementwise.activation`); a
linear whose output only feeds a slice of its first N columns (``plan.py``) computes just
those columns, from a view of the weight.
"""

from __future__ import annotations

from transfuse.codegen.onnx.elementwise import activation
from transfuse.codegen.onnx.registry import LOWERINGS, fusable, inputs_as, out_dtype
from transfuse.ir.graph import Value


@LOWERINGS.register("matmul")
def _matmul(b, node):
    return b.add("MatMul", inputs_as(b, node, out_dtype(node)))




def _weight_t(b, w: Value, name: str) -> str:
    """[K, N] for MatMul from the [N, K] weight ``w`` (ONNX ``name``): a transposed constant
    made once, else a Transpose node."""
    if w.is_const:
        t = b.initializers[name] if name in b.initializers else w.const
        return b.derived(("wT", name), lambda: t.detach().t().contiguous(), f"{w.name}_T")
    return b.add("Transpose", [name], perm=[1, 0])


@LOWERINGS.register("linear")
def _linear(b, node):
    """x @ Wᵀ (+ bias) then the activation; W [N, K] stays in torch layout under FusedMatMul."""
    dtype = out_dtype(node)
    x = b.input(node, 0, dtype)
    w = node.inputs[1]
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    n = b.narrowed.get(id(node))
    if n is not None:  # only the first n output columns are read: compute only those
        w_name = b.derived(("rows", id(w), n), lambda: w.const[:n], f"{w.name}_rows")
        b_name = "" if bias is None else b.derived(("rows", id(bias), n),
                                                   lambda: bias.const[:n], f"{bias.name}_rows")
    else:
        w_name, b_name = b.name(w), b.name(bias) if bias is not None else ""
    b_name = b.cast(b_name, bias.type.dtype, dtype) if bias is not None else ""
    if fusable(b, node) and w.type.dtype == dtype and b.fused_matmul:
        mm = b.ms("FusedMatMul", [x, w_name], transB=1, alpha=1.0)
    else:
        wt = _weight_t(b, w, w_name)
        mm = b.add("MatMul", [x, b.cast(wt, w.type.dtype, dtype)])
    if id(node) in b.folded_bias:
        b_name = ""
    return activation(b, node, mm, b_name, node.attrs["activation"], dtype)
