"""Lowerings of the fused Transformer ops: ORT's com.microsoft operators where they match.

Each lowering picks ORT's fused operator only when it computes what the IR op
computes (checked numerically in ``tests/codegen/test_onnx_backend.py``) and
otherwise writes the op with standard ONNX ops, so every node lowers:

- ``attention`` -> ``GroupQueryAttention`` / ``MultiHeadAttention`` / standard ops: see
  :mod:`transfuse.codegen.onnx_attention`.
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

import math

import torch

from transfuse.codegen.onnx_ops import lowering, out_dtype
from transfuse.ir.graph import Node, Value
from transfuse.ir.types import DType, dims_equal

_FUSED_DTYPES = (DType.f32,)


def _fusable(b, node: Node) -> bool:
    return b.fused and out_dtype(node) in _FUSED_DTYPES and all(
        v is None or v.type.dtype in _FUSED_DTYPES or not v.type.dtype.is_float
        for v in node.inputs)


def _producer(v: Value | None, op: str) -> Node | None:
    if v is None or v.producer is None or v.producer.op != op:
        return None
    return v.producer


# -- planning: decisions that span two nodes ------------------------------------------------


def plan(b) -> None:
    """Before lowering: decisions that look at a node and its users.

    - a linear whose output only feeds a ``slice`` keeping its first N columns computes just
      those (``layout.pad-gemm-columns`` pads wide GEMMs for PyTorch's kernels; ORT's are
      faster unpadded and its Slice would copy the logits);
    - an add_norm absorbs the bias of a linear that only feeds it.
    """
    for node in b.graph.nodes:
        cut = _narrowing_slice(node)
        if cut is not None:
            b.narrowed[id(node)] = cut
    for node in b.graph.nodes:
        if node.op != "add_norm" or _add_norm_refuses(b, node) is not None:
            continue
        for v in node.inputs[:2]:
            lin = _producer(v, "linear")
            if (lin is not None and len(lin.inputs) > 2 and lin.inputs[2] is not None
                    and lin.attrs["activation"] is None and v.num_uses == 1
                    and v.type == node.outputs[0].type):
                b.folded_bias.add(id(lin))
                break


def _narrowing_slice(node: Node):
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


# -- linear and activations -------------------------------------------------------------------


def _weight_t(b, w: Value, name: str) -> str:
    """[K, N] for MatMul from the [N, K] weight ``w`` (ONNX ``name``): a transposed constant
    made once, else a Transpose node."""
    if w.is_const:
        t = b.initializers[name] if name in b.initializers else w.const
        return b.derived(("wT", name), lambda: t.detach().t().contiguous(), f"{w.name}_T")
    return b.add("Transpose", [name], perm=[1, 0])


def gelu_std(b, x: str, approximate: str, dtype: DType) -> str:
    """GELU with standard ops, in the reference's order of operations."""
    half = b.const(0.5, dtype, "half")
    one = b.const(1.0, dtype, "one")
    if approximate == "tanh":
        cube = b.add("Mul", [b.add("Mul", [x, x]), x])
        inner = b.add("Add", [x, b.add("Mul", [cube, b.const(0.044715, dtype, "k")])])
        t = b.add("Tanh", [b.add("Mul", [inner, b.const(math.sqrt(2 / math.pi), dtype, "k")])])
        return b.add("Mul", [b.add("Mul", [x, half]), b.add("Add", [t, one])])
    e = b.add("Erf", [b.add("Mul", [x, b.const(1 / math.sqrt(2), dtype, "k")])])
    return b.add("Mul", [b.add("Mul", [x, half]), b.add("Add", [e, one])])


def activation(b, node: Node, x: str, bias: str, act: str | None, dtype: DType) -> str:
    """``act(x + bias)`` (bias may be ""), with fused ops where allowed."""
    fused = _fusable(b, node)
    if fused and act == "gelu_tanh":
        return b.ms("FastGelu", [x, bias] if bias else [x])
    if fused and act == "gelu":
        return b.ms("BiasGelu", [x, bias]) if bias else b.ms("Gelu", [x])
    if bias:
        x = b.add("Add", [x, bias])
    if act is None:
        return x
    if act == "relu":
        return b.add("Relu", [x])
    if act == "silu":
        return b.ms("QuickGelu", [x], alpha=1.0) if fused else \
            b.add("Mul", [x, b.add("Sigmoid", [x])])
    return gelu_std(b, x, "tanh" if act == "gelu_tanh" else "none", dtype)


@lowering("linear")
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
    if _fusable(b, node) and w.type.dtype == dtype and b.fused_matmul:
        mm = b.ms("FusedMatMul", [x, w_name], transB=1, alpha=1.0)
    else:
        wt = _weight_t(b, w, w_name)
        mm = b.add("MatMul", [x, b.cast(wt, w.type.dtype, dtype)])
    if id(node) in b.folded_bias:
        b_name = ""
    return activation(b, node, mm, b_name, node.attrs["activation"], dtype)


@lowering("gelu")
def _gelu(b, node):
    dtype = out_dtype(node)
    x = b.input(node, 0, dtype)
    act = "gelu_tanh" if node.attrs["approximate"] == "tanh" else "gelu"
    return activation(b, node, x, "", act, dtype)


@lowering("swiglu")
def _swiglu(b, node):
    dtype = out_dtype(node)
    gate, up = b.input(node, 0, dtype), b.input(node, 1, dtype)
    return b.add("Mul", [activation(b, node, gate, "", "silu", dtype), up])


# -- norms -----------------------------------------------------------------------------------------


def _norm_weight(b, w: Value | None, offset: float, dtype: DType) -> str:
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
    from onnx import helper

    from transfuse.codegen.onnx import onnx_dtype

    return helper.make_tensor("value", onnx_dtype(dtype), [1], [1.0])


@lowering("layer_norm")
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
    scale = _norm_weight(b, w, a["offset"], dtype)
    return b.add("Mul", [b.cast(h, x_dtype, dtype), scale])


@lowering("rms_norm")
def _rms_norm(b, node):
    x = node.inputs[0]
    w = node.inputs[1] if len(node.inputs) > 1 else None
    return rms_norm_std(b, b.name(x), x.type.dtype, node, w)


def _add_norm_refuses(b, node: Node) -> str | None:
    """Why SkipLayerNormalization / SkipSimplifiedLayerNormalization cannot take this node."""
    if not _fusable(b, node):
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


@lowering("add_norm")
def _add_norm(b, node):
    """(norm(x + residual), x + residual)."""
    a = node.attrs
    dtype = out_dtype(node)
    w = node.inputs[2] if len(node.inputs) > 2 else None
    beta = node.inputs[3] if len(node.inputs) > 3 else None
    if _add_norm_refuses(b, node) is None:
        xv, rv = node.inputs[0], node.inputs[1]
        out = node.outputs[0].type
        if not _is(xv.type, out):
            xv, rv = rv, xv  # the full-shaped addend is "input", the other "skip"
        ins = [b.name(xv), b.name(rv)]
        bias = ""
        for v in node.inputs[:2]:
            lin = _producer(v, "linear")
            if lin is not None and id(lin) in b.folded_bias:
                bias = b.input(lin, 2, dtype)
        if a["kind"] == "layer":
            ins += [b.name(w), b.name(beta) if beta is not None else "", bias]
            op_type = "SkipLayerNormalization"
        else:
            ins += [_norm_weight(b, w, a["offset"], dtype), bias]
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
    sc, ss = _producer(cos, "slice"), _producer(sin, "slice")
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


def _half_table(b, table: Value, interleaved: bool) -> str:
    d = table.type.shape[1]
    return b.derived(("half", id(table), interleaved),
                     lambda: (table.const[:, 0::2] if interleaved else table.const[:, : d // 2])
                     .contiguous(), f"{table.name}_half")


def _rotary_layout(node: Node) -> str | None:
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


@lowering("rotary")
def _rotary(b, node):
    """x * cos + rotate(x) * sin; ``RotaryEmbedding`` (offset position ids) when it fits."""
    tables = rotary_tables(node) if _fusable(b, node) else None
    layout = _rotary_layout(node)
    if tables is None or layout is None:
        return _rotary_std(b, node)
    tc, ts, start = tables
    x = node.inputs[0]
    interleaved = node.attrs["interleaved"]
    caches = [_half_table(b, tc, interleaved), _half_table(b, ts, interleaved)]
    pos = b.dim(start)
    heads = x.type.shape[1] if layout == "bhsd" else x.type.shape[2]
    flat = (b.heads_first if layout == "bhsd" else b.split_heads).get(id(x))
    if flat is not None:  # rotate the [B, S, H*D] projection: no transposes at all
        out3 = b.ms("RotaryEmbedding", [flat, pos, *caches], interleaved=int(interleaved),
                    num_heads=heads)
        (b.heads_first if layout == "bhsd" else b.split_heads)[id(node.outputs[0])] = out3
        return _unflatten(b, out3, node.outputs[0], layout)
    if layout == "bhsd":
        return b.ms("RotaryEmbedding", [b.name(x), pos, *caches], interleaved=int(interleaved))
    t = x.type.shape
    flat = b.add("Reshape", [b.name(x), b.reshape_target([t[0], t[1], t[2] * t[3]])])
    out3 = b.ms("RotaryEmbedding", [flat, pos, *caches], interleaved=int(interleaved),
                num_heads=heads)
    return b.add("Reshape", [out3, b.reshape_target(t)])


def _unflatten(b, flat: str, v: Value, layout: str) -> str:
    """The 4-D ``v`` (bhsd or bshd) from its [B, S, H*D] form."""
    t = v.type.shape
    if layout == "bhsd":
        bshd = b.add("Reshape", [flat, b.reshape_target([t[0], t[2], t[1], t[3]])])
        return b.add("Transpose", [bshd], perm=[0, 2, 1, 3])
    return b.add("Reshape", [flat, b.reshape_target(t)])


# the attention lowerings (GroupQueryAttention / MultiHeadAttention / standard ops)
from transfuse.codegen import onnx_attention  # noqa: E402,F401
