"""The ONNX -> IR conversion table, one file per op family.

One converter per ONNX op type (default domain and com.microsoft), registered with
:func:`~transfuse.frontend.onnx_ops.registry.onnx_op` in the family's file. This package
imports every family file below, so the table is complete once the package is imported,
whatever imports it first.

A converter is ``fn(cx, node) -> [output, ...]`` where ``node`` is an :class:`OnnxNode`
(op type, attributes, ``node.input(i)``) and ``cx`` the frontend's converter
(``transfuse.frontend.onnx._Converter``): ``cx.value(x)`` makes any input an IR
value, ``cx.op(...)`` creates an IR node carrying the node's provenance,
``cx.fail(msg)`` / ``cx.unsupported(msg)`` build errors naming the node. An output is
an IR :class:`Value`, a :class:`Known`, or ``None`` (an optional output transfuse
does not produce; reading it later is an error).

Known values. Shape computations are evaluated at capture: ``Shape`` gives a
:class:`Known` (a small array of ints and sympy dims such as ``[batch, seq, 768]``),
and the ops of shape arithmetic (Gather, Slice, Concat, Unsqueeze, Squeeze, Reshape,
Cast, Add/Sub/Mul/Div/Mod, Max/Min, comparisons, Where, Range, ConstantOfShape, ...)
compute Known results from Known inputs (each such op has a ``known`` evaluator; see
``known.py``). Small constants are Known too. A constant the frontend would make itself
(Range, ConstantOfShape, Expand/Tile of a constant, index tables) above the size limit of
:mod:`transfuse.ir.limits` is refused before it is allocated
(``helpers.check_constant_size``). Ops that need a shape (Reshape, Expand, Range, Slice,
ConstantOfShape, Tile, Split, ...) read it from a Known input and put it in the IR op's attrs; a shape input that is not Known is a :class:`CaptureError`. A Known used
as data becomes a constant, or for symbolic entries ``shape_of`` arithmetic.

Spellings kept close to what the torch frontend produces, so the passes see the
same IR: ``MatMul``/``Gemm`` with a constant 2-D weight -> ``linear`` (the weight
transposed once, shared); ``Gather`` of a 2-D constant on axis 0 -> ``embedding``;
``Reciprocal(Sqrt(x))`` -> ``rsqrt``; ``Expand`` of a one-element constant -> ``full``;
``Range`` -> ``arange``; ``Trilu`` -> ``tril``/``triu``; ``GatherND`` -> ``index``
of its components, as aten ``index.Tensor`` (Hugging Face's mask functions); a Reshape of a
Transpose of a Reshape that only moves trailing dims -> one ``permute`` (the
exporter's rank-agnostic key transpose); ``Where(IsNaN(Softmax(s + where(m, 0, c))),
0, ·)`` with a finite ``c`` -> the softmax itself (the row of a finite mask is never
all -inf, so the guard is the identity).
``Einsum`` -> reduce_sum / mul / linear / matmul / permute, shared with the torch frontend
(``frontend/einsum.py``): attention's ``bhqd,bhkd->bhqk`` is ``matmul(q, permute(k))``.

Glossary for attention: B batch, H heads, S query length, T key length, D head dim.
"""

from transfuse.frontend.onnx_ops import (  # noqa: F401  (each file registers its converters)
    activations,
    arith,
    attention,
    casts,
    creation,
    indexing,
    linalg,
    masks,
    norms,
    reduce,
    rotary,
    shape,
)
from transfuse.frontend.onnx_ops.known import KNOWN_MAX, Known, known, materialize, tensor_result
from transfuse.frontend.onnx_ops.registry import (
    TABLE,
    Missing,
    OnnxNode,
    lookup,
    node_label,
    onnx_op,
    supported_ops,
)

__all__ = ["TABLE", "KNOWN_MAX", "Known", "Missing", "OnnxNode", "onnx_op", "lookup",
           "supported_ops", "known", "materialize", "tensor_result", "node_label"]
