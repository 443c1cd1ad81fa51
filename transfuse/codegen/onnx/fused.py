"""Lowerings of the fused Transformer ops: ORT's com.microsoft operators where they match.

Each lowering picks ORT's fused operator only when it computes what the IR op
computes (checked numerically in ``tests/codegen/test_onnx_backend.py``) and
otherwise writes the op with standard ONNX ops, so every node lowers:

- ``attention`` -> ``GroupQueryAttention`` / ``MultiHeadAttention`` / standard ops: see
  ``attention.py``.
- ``add_norm`` -> ``SkipSimplifiedLayerNormalization`` (rms) and, for CUDA providers,
  ``SkipLayerNormalization`` (layer) (outputs: normed, -, -, sum), absorbing the bias of
  the linear that feeds it; on ORT's CPU EP a layer add_norm is Add + LayerNormalization,
  measured ~5x faster than its SkipLayerNormalization kernel (onnxruntime 1.32).
- a linear feeding only a slice of its first N columns (``layout.pad-gemm-columns``)
  computes just those columns, from a view of the weight.
- ``linear`` -> ``FusedMatMul`` (transB: the torch-layout weight, not copied) with
  ``FastGelu`` (tanh GELU) or ``BiasGelu``/``Gelu`` (erf GELU) — a tanh GELU never
  becomes BiasGelu, whose GELU is the erf one.
- ``rotary`` -> ``RotaryEmbedding``: see ``rotary.py`` (re-exported here: its table
  helpers are what ``attention.py`` folds into GroupQueryAttention); ``gelu`` ->
  ``Gelu``/``FastGelu``; ``silu``/``swiglu`` -> ``QuickGelu`` (alpha = 1).

Fused ops are used for f32 only (ORT's CPU kernels compute these in f32 anyway);
other dtypes take the standard-op path. Glossary: B batch, H heads, Hkv kv heads,
S query length, T key length, D head dim, Dv value head dim, E normalized size.

"""

from __future__ import annotations

from transfuse.codegen.onnx.elementwise import activation
from transfuse.codegen.onnx.nn import layer_norm_std, norm_weight, rms_norm_std
from transfuse.codegen.onnx.registry import LOWERINGS, fusable, out_dtype, producer
from transfuse.codegen.onnx.rotary import (  # noqa: F401  re-exported for attention.py
    half_table,
    rotary_layout,
    rotary_tables,
    unflatten,
)
from transfuse.ir.graph import Node
from transfuse.ir.types import dims_equal


@LOWERINGS.register("swiglu")
def _swiglu(b, node):
    dtype = out_dtype(node)
    gate, up = b.input(node, 0, dtype), b.input(node, 1, dtype)
    return b.add("Mul", [activation(b, node, gate, "", "silu", dtype), up])




def add_norm_refuses(b, node: Node) -> str | None:
    """Why SkipLayerNormalization / SkipSimplifiedLayerNormalization cannot take this node."""
    if not fusable(b, node):
        return "not f32 or fused ops disabled"
    a = node.attrs
    if a["kind"] == "layer" and not b.skip_layer_norm:
        return ("SkipLayerNormalization is ~5x slower than Add + LayerNormalization on ORT's "
                "CPU execution provider (measured, 1.32); used with the CUDA provider only")
    out = node.outputs[0].type
    w = node.inputs[2] if len(node.inputs) > 2 else None
    if w is None or a["normalized_ndim"] != 1 or out.rank not in (2, 3):
        return "needs a weight, one normalized dim and a 2-D or 3-D input"
    x, r = node.inputs[0].type, node.inputs[1].type
    if not (_is(x, out) or _is(r, out)):
        return "neither addend has the sum's shape"
    skip = r if _is(x, out) else x
    if not (_is(skip, out) or (out.rank == 3 and (
            (skip.rank == 3 and skip.shape[0] == 1 and _same(skip.shape[1:], out.shape[1:]))
            or (skip.rank == 2 and _same(skip.shape, out.shape[1:]))))):
        return f"skip {skip} does not broadcast the way SkipLayerNormalization does"
    return None


def _is(t, out) -> bool:
    return t.rank == out.rank and _same(t.shape, out.shape)


def _same(a, c) -> bool:
    return len(a) == len(c) and all(dims_equal(p, q) for p, q in zip(a, c))


@LOWERINGS.register("add_norm")
def _add_norm(b, node):
    """(norm(x + residual), x + residual)."""
    a = node.attrs
    dtype = out_dtype(node)
    w = node.inputs[2] if len(node.inputs) > 2 else None
    beta = node.inputs[3] if len(node.inputs) > 3 else None
    if add_norm_refuses(b, node) is None:
        xv, rv = node.inputs[0], node.inputs[1]
        out = node.outputs[0].type
        if not _is(xv.type, out):
            xv, rv = rv, xv  # the full-shaped addend is "input", the other "skip"
        ins = [b.name(xv), b.name(rv)]
        bias = ""
        for v in node.inputs[:2]:
            lin = producer(v, "linear")
            if lin is not None and id(lin) in b.folded_bias:
                bias = b.input(lin, 2, dtype)
        if a["kind"] == "layer":
            ins += [b.name(w), b.name(beta) if beta is not None else "", bias]
            op_type = "SkipLayerNormalization"
        else:
            ins += [norm_weight(b, w, a["offset"], dtype), bias]
            op_type = "SkipSimplifiedLayerNormalization"
        while ins[-1] == "":
            ins.pop()
        normed, _, _, total = b.ms(op_type, ins, 4, epsilon=a["eps"])
        return [normed, total]
    return add_norm_std(b, node)


def add_norm_std(b, node: Node, rms=None) -> list[str]:
    """(norm(x + residual), x + residual) as Add + LayerNormalization / the RMSNorm of
    ``rms(b, total, total_type, node, weight)`` (default: :func:`rms_norm_std`'s ops)."""
    a = node.attrs
    dtype = out_dtype(node)
    w = node.inputs[2] if len(node.inputs) > 2 else None
    beta = node.inputs[3] if len(node.inputs) > 3 else None
    x, r = b.input(node, 0, dtype), b.input(node, 1, dtype)
    total = b.add("Add", [x, r])
    out_type = node.outputs[0].type
    if a["kind"] == "layer":
        normed = layer_norm_std(b, total, node, out_type, w, beta, a["eps"],
                                a["normalized_ndim"])
    elif rms is not None:
        normed = rms(b, total, out_type, node, w)
    else:
        normed = rms_norm_std(b, total, dtype, node, w)
    return [normed, total]
