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
- ``rotary`` -> ``RotaryEmbedding`` when cos/sin are rows of constant tables whose two
  halves (or pairs) repeat each frequency; ``gelu`` -> ``Gelu``/``FastGelu``;
  ``silu``/``swiglu`` -> ``QuickGelu`` (alpha = 1).

Fused ops are used for f32 only (ORT's CPU kernels compute these in f32 anyway);
other dtypes take the standard-op path. Glossary: B batch, H heads, Hkv kv heads,
S query length, T key length, D head dim, Dv value head dim, E normalized size.

"""

from __future__ import annotations

import torch

from transfuse.codegen.onnx.elementwise import activation
from transfuse.codegen.onnx.nn import layer_norm_std, norm_weight, rms_norm_std
from transfuse.codegen.onnx.registry import LOWERINGS, fusable, out_dtype, producer
from transfuse.ir.graph import Node, Value
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
    x, r = b.input(node, 0, dtype), b.input(node, 1, dtype)
    total = b.add("Add", [x, r])
    if a["kind"] == "layer":
        normed = layer_norm_std(b, total, node, node.outputs[0].type, w, beta, a["eps"],
                                a["normalized_ndim"])
    else:
        normed = rms_norm_std(b, total, dtype, node, w)
    return [normed, total]




# -- rotary ----------------------------------------------------------------------------------------


def rotary_tables(node: Node) -> tuple[Value, Value, object] | None:
    """(cos table, sin table, first position) when cos/sin are rows start.. of constant tables
    [P, D] (``slice`` along axis 0) whose frequencies repeat the way ``interleaved`` says."""
    cos, sin = node.inputs[1], node.inputs[2]
    sc, ss = producer(cos, "slice"), producer(sin, "slice")
    if sc is None or ss is None:
        return None
    tc, ts = sc.inputs[0], ss.inputs[0]
    if not (tc.is_const and ts.is_const) or tc.type.rank != 2 or ts.type != tc.type:
        return None
    for s in (sc, ss):
        if s.attrs["axis"] % 2 != 0 or s.attrs["step"] != 1:
            return None
    if not dims_equal(sc.attrs["start"], ss.attrs["start"]):
        return None
    d = tc.type.shape[1]
    for t in (tc.const, ts.const):
        if node.attrs["interleaved"]:
            if not torch.equal(t[:, 0::2], t[:, 1::2]):
                return None
        elif not torch.equal(t[:, : d // 2], t[:, d // 2:]):
            return None
    return tc, ts, sc.attrs["start"]


def half_table(b, table: Value, interleaved: bool) -> str:
    d = table.type.shape[1]
    return b.derived(("half", id(table), interleaved),
                     lambda: (table.const[:, 0::2] if interleaved else table.const[:, : d // 2])
                     .contiguous(), f"{table.name}_half")


def rotary_layout(node: Node) -> str | None:
    """'bhsd' (x [B, H, S, D], cos [S, D]) or 'bshd' (x [B, S, H, D], cos [S, 1, D])."""
    x, cos = node.inputs[0].type, node.inputs[1].type
    if x.rank != 4 or node.inputs[2].type != cos:
        return None
    if cos.rank == 2 and dims_equal(cos.shape[0], x.shape[2]):
        return "bhsd"
    if cos.rank == 3 and cos.shape[1] == 1 and dims_equal(cos.shape[0], x.shape[1]):
        return "bshd"
    return None


def _rotary_std(b, node: Node) -> str:
    dtype = out_dtype(node)
    x, cos, sin = (b.input(node, i, dtype) for i in range(3))
    d = node.inputs[0].type.shape[-1]
    if node.attrs["interleaved"]:
        even = b.add("Slice", [x, b.ints([0]), b.ints([d]), b.ints([-1]), b.ints([2])])
        odd = b.add("Slice", [x, b.ints([1]), b.ints([d]), b.ints([-1]), b.ints([2])])
        pairs = b.add("Concat", [b.unsqueeze(b.add("Neg", [odd]), [-1]),
                                 b.unsqueeze(even, [-1])], axis=-1)
        rot = b.add("Reshape", [pairs, b.add("Shape", [x])])
    else:
        x1, x2 = b.split(x, [d // 2, d // 2], -1)
        rot = b.add("Concat", [b.add("Neg", [x2]), x1], axis=-1)
    return b.add("Add", [b.add("Mul", [x, cos]), b.add("Mul", [rot, sin])])


@LOWERINGS.register("rotary")
def _rotary(b, node):
    """x * cos + rotate(x) * sin; ``RotaryEmbedding`` (offset position ids) when it fits."""
    tables = rotary_tables(node) if fusable(b, node) else None
    layout = rotary_layout(node)
    if tables is None or layout is None:
        return _rotary_std(b, node)
    tc, ts, start = tables
    x = node.inputs[0]
    interleaved = node.attrs["interleaved"]
    caches = [half_table(b, tc, interleaved), half_table(b, ts, interleaved)]
    pos = b.dim(start)
    heads = x.type.shape[1] if layout == "bhsd" else x.type.shape[2]
    flat = (b.heads_first if layout == "bhsd" else b.split_heads).get(id(x))
    if flat is not None:  # rotate the [B, S, H*D] projection: no transposes at all
        out3 = b.ms("RotaryEmbedding", [flat, pos, *caches], interleaved=int(interleaved),
                    num_heads=heads)
        (b.heads_first if layout == "bhsd" else b.split_heads)[id(node.outputs[0])] = out3
        return unflatten(b, out3, node.outputs[0], layout)
    if layout == "bhsd":
        return b.ms("RotaryEmbedding", [b.name(x), pos, *caches], interleaved=int(interleaved))
    t = x.type.shape
    flat = b.add("Reshape", [b.name(x), b.reshape_target([t[0], t[1], t[2] * t[3]])])
    out3 = b.ms("RotaryEmbedding", [flat, pos, *caches], interleaved=int(interleaved),
                num_heads=heads)
    return b.add("Reshape", [out3, b.reshape_target(t)])


def unflatten(b, flat: str, v: Value, layout: str) -> str:
    """The 4-D ``v`` (bhsd or bshd) from its [B, S, H*D] form."""
    t = v.type.shape
    if layout == "bhsd":
        bshd = b.add("Reshape", [flat, b.reshape_target([t[0], t[2], t[1], t[3]])])
        return b.add("Transpose", [bshd], perm=[0, 2, 1, 3])
    return b.add("Reshape", [flat, b.reshape_target(t)])
