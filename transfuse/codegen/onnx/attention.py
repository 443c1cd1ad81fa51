"""The ``attention`` lowering: ORT's attention operators where they compute the IR op exactly.

- ``GroupQueryAttention`` for self-attention (S == T; MHA or GQA, causal or not):
  ``window`` -> ``local_window_size`` (same meaning: key j is seen from position i when
  i - window < j <= i), ``softcap``, an additive bias expanded to [B|1, H|1, S, T], the
  packed q|k|v projection instead of three Split outputs, and rotary embedding of q and k
  from position 0 folded in as ``do_rotary``. Measured faster than MultiHeadAttention and
  than standard ops on ORT's CPU EP, also for H == Hkv and non-causal attention.
- ``MultiHeadAttention`` for the other non-causal MHA: a key padding mask (masked keys get
  the lowest float added, so exp underflows to exactly 0 as with -inf; a batch entry with
  every key padded is set to zeros as in the IR), cross-attention (S != T).
- standard ops (MatMul / Softmax, GQA without repeating K/V) for what those cannot express:
  ALiBi, causal/window/softcap attention with S != T (MultiHeadAttention's
  ``unidirectional`` is top-left aligned there, the IR's causal is bottom-right), a key
  padding mask with causal/window masks, and causal/window/softcap/GQA attention whose head
  size GroupQueryAttention's CPU kernel rejects (the head-size rules, with their source, are
  data in ``contrib_limits.py``; non-causal MHA with such a head size goes to
  MultiHeadAttention).

The q/k/v inputs are looked through to their [B, S, H*D] projections (the builder's
``heads_first`` / ``split_heads`` views), and the output is recorded the same way, so the
permute/reshape pairs around an attention op cost nothing. Glossary: B batch, H heads,
Hkv kv heads, S query length, T key length, D head dim, Dv value head dim.
"""

from __future__ import annotations

import math

import torch

from transfuse.codegen.onnx.contrib_limits import GQA_HEAD_SIZE, MHA_HEAD_SIZE
from transfuse.codegen.onnx.fused import half_table, rotary_layout, rotary_tables, unflatten
from transfuse.codegen.onnx.registry import LOWERINGS, fusable, out_dtype, producer
from transfuse.codegen.onnx.tensors import onnx_dtype
from transfuse.ir.graph import Node, Value
from transfuse.ir.types import DType, dims_equal

_LOWEST = float(torch.finfo(torch.float32).min)
# -- attention -------------------------------------------------------------------------------------


def attention_dims(node: Node):
    """(B, H, S, D), (Hkv, T, Dv) of an ``attention`` node in bhsd terms whatever its
    layout."""
    layout = node.attrs["layout"]

    def bhsd(t):
        b_, x1, x2, d = t.shape
        return (b_, x2, x1, d) if layout == "bshd" else (b_, x1, x2, d)

    b_, h, s, d = bhsd(node.inputs[0].type)
    _, hkv, t, _ = bhsd(node.inputs[1].type)
    dv = node.inputs[2].type.shape[3]
    return (b_, h, s, d), (hkv, t, dv)


def attention_route(b, node: Node) -> tuple[str | None, str]:
    """("gqa" | "mha" | None, why): which ORT attention op can compute this node exactly."""
    if not fusable(b, node):
        return None, "not f32 or fused ops disabled"
    a = node.attrs
    (_, h, s, d), (hkv, t, dv) = attention_dims(node)
    bias = node.inputs[3] if len(node.inputs) > 3 else None
    kpm = node.inputs[4] if len(node.inputs) > 4 else None
    if a["alibi"] is not None:
        return None, "ALiBi"
    square = dims_equal(s, t)
    if bias is not None and not _bias_fits(node, bias):
        return None, f"bias {bias.type} does not broadcast as [B|1, H|1, S|1, T]"
    if a["window"] is not None and not a["causal"]:
        return None, "a window without causal masking"
    gqa_refuses = GQA_HEAD_SIZE.refuses(d, dv)
    if square and dv == d and kpm is None and gqa_refuses is None:
        # self-attention: GroupQueryAttention also for H == Hkv and non-causal (causal=0); it
        # takes the packed q|k|v projection and measured faster than MultiHeadAttention
        return "gqa", ""
    if a["causal"] or a["window"] is not None or a["softcap"] is not None or hkv != h:
        if not square:
            return None, "causal / window / softcap / GQA attention with S != T"
        if kpm is not None:
            return None, "a key padding mask together with causal / window / softcap / GQA"
        if gqa_refuses is not None:
            return None, gqa_refuses
        return None, "GroupQueryAttention needs equal q/k and v head dims"
    mha_refuses = MHA_HEAD_SIZE.refuses(d, dv)
    if mha_refuses is not None:
        return None, mha_refuses
    return "mha", ""


def _bias_fits(node: Node, bias: Value) -> bool:
    (bb, h, s, _), (_, t, _) = attention_dims(node)
    shape = (1,) * (4 - bias.type.rank) + tuple(bias.type.shape)
    return (len(shape) == 4 and (shape[0] == 1 or dims_equal(shape[0], bb))
            and (shape[1] == 1 or dims_equal(shape[1], h))
            and (shape[2] == 1 or dims_equal(shape[2], s)) and dims_equal(shape[3], t))


def _flat(b, v: Value, layout: str) -> str:
    """``v`` (4-D q/k/v) as [B, S, H*D]: the projection it was reshaped from when known."""
    flat = (b.heads_first if layout == "bhsd" else b.split_heads).get(id(v))
    if flat is not None:
        return flat
    x = b.name(v)
    t = v.type.shape
    if layout == "bhsd":
        x = b.add("Transpose", [x], perm=[0, 2, 1, 3])
        t = (t[0], t[2], t[1], t[3])
    return b.add("Reshape", [x, b.reshape_target([t[0], t[1], t[2] * t[3]])])


def _bias_4d(b, node: Node, bias: Value, dtype: DType) -> str:
    """The bias as [B|1, H|1, S, T]: ORT's attention ops want the full S dim."""
    (_, _, s, _), _ = attention_dims(node)

    def make() -> str:
        name = b.cast(b.name(bias), bias.type.dtype, dtype)
        shape = (1,) * (4 - bias.type.rank) + tuple(bias.type.shape)
        if bias.type.rank < 4:
            name = b.add("Reshape", [name, b.reshape_target(shape)])
        if shape[2] == 1 and not dims_equal(s, 1):
            name = b.add("Expand", [name, b.shape([1, 1, s, 1])])
        return name

    # one padding bias serves every layer
    return b.memo(("bias_4d", b.name(bias), dtype, str(s)), make)


def _rotary_fold(b, node: Node):
    """(q source, k source, cos cache, sin cache, interleaved) when q and k are both rotated
    from position 0 with the same constant tables (GroupQueryAttention's do_rotary)."""
    layout = node.attrs["layout"]
    rq, rk = producer(node.inputs[0], "rotary"), producer(node.inputs[1], "rotary")
    if rq is None or rk is None or layout != "bhsd":
        return None
    if rq.attrs["interleaved"] != rk.attrs["interleaved"] or rq.inputs[1:] != rk.inputs[1:]:
        return None
    (_, _, _, d), _ = attention_dims(node)
    if d % 16 or rotary_layout(rq) != "bhsd" or rotary_layout(rk) != "bhsd":
        return None  # ORT's kernel rotates head sizes that are multiples of 16
    tables = rotary_tables(rq)
    if tables is None or not (isinstance(tables[2], int) and tables[2] == 0):
        return None
    qf, kf = b.heads_first.get(id(rq.inputs[0])), b.heads_first.get(id(rk.inputs[0]))
    if qf is None or kf is None:
        return None
    inter = rq.attrs["interleaved"]
    return qf, kf, half_table(b, tables[0], inter), half_table(b, tables[1], inter), inter


@LOWERINGS.register("attention")
def _attention(b, node):
    route, why = attention_route(b, node)
    if route is None:
        if fusable(b, node):  # say once per reason why ORT's attention ops were not used
            b.memo(("attention-route", why), lambda: b.notes.append(
                f"attention with standard ops: {why}") or why)
        return attention_std(b, node)
    a = node.attrs
    layout = a["layout"]
    dtype = out_dtype(node)
    (bb, h, s, d), (hkv, t, dv) = attention_dims(node)
    bias = node.inputs[3] if len(node.inputs) > 3 else None
    kpm = node.inputs[4] if len(node.inputs) > 4 else None
    scale = a["scale"] if a["scale"] is not None else 1.0 / math.sqrt(d)
    v = _flat(b, node.inputs[2], layout)
    if route == "gqa":
        fold = _rotary_fold(b, node)
        if fold is not None:
            q, k, cos_c, sin_c, inter = fold
        else:
            q, k = _flat(b, node.inputs[0], layout), _flat(b, node.inputs[1], layout)
            cos_c = sin_c = ""
        packed = _packed(b, q, k, v)
        if packed:  # q|k|v are the three parts of one projection: no Split
            q, k, v = packed, "", ""
        total = b.scalar_dim(t, DType.i32)
        # every key is valid: T - 1 for each batch entry, once per graph
        seqlens = b.memo(("seqlens_k", total, str(bb)), lambda: b.add(
            "Expand", [b.add("Sub", [total, b.const(1, DType.i32, "one")]), b.shape([bb])],
            hint="seqlens_k"))
        ins = [q, k, v, "", "", seqlens, total, cos_c, sin_c, "",
               _bias_4d(b, node, bias, dtype) if bias is not None else ""]
        while ins[-1] == "":
            ins.pop()
        out = b.ms("GroupQueryAttention", ins, num_heads=h, kv_num_heads=hkv, scale=scale,
                   causal=int(a["causal"]),
                   local_window_size=a["window"] if a["window"] is not None else None,
                   softcap=a["softcap"], do_rotary=1 if fold is not None else None,
                   rotary_interleaved=int(fold[4]) if fold is not None else None)
    else:
        q, k = _flat(b, node.inputs[0], layout), _flat(b, node.inputs[1], layout)
        ins = [q, k, v, "", "", ""]
        if kpm is not None:
            ins[4] = b.cast(b.name(kpm), kpm.type.dtype, DType.i32)
        if bias is not None:
            ins[5] = _bias_4d(b, node, bias, dtype)
        while ins[-1] == "":
            ins.pop()
        # masked keys get the lowest float added (exp underflows to exactly 0, as with -inf)
        out = b.ms("MultiHeadAttention", ins, num_heads=h, scale=scale,
                   mask_filter_value=_LOWEST if kpm is not None else None)
        if kpm is not None:  # a row with every key padded is zeros in the IR
            any_key = b.add("Cast", [b.reduce("ReduceMax", b.cast(b.name(kpm), kpm.type.dtype,
                                                                  DType.f32), [1], True)],
                            to=onnx_dtype(DType.bool))
            out = b.add("Where", [b.unsqueeze(any_key, [2]), out, b.const(0.0, dtype, "zero")])
    (b.heads_first if layout == "bhsd" else b.split_heads)[id(node.outputs[0])] = out
    return unflatten(b, out, node.outputs[0], layout)


def _packed(b, q: str, k: str, v: str) -> str | None:
    """The tensor q, k and v were split from, in that order and nothing else (GQA's packed
    QKV input: [B, S, H*D + 2*Hkv*D])."""
    parts = [b.split_of.get(x) for x in (q, k, v)]
    if any(p is None for p in parts) or len({p[0] for p in parts}) != 1:
        return None
    if [p[1] for p in parts] != [0, 1, 2] or parts[0][2] != 3:
        return None
    return parts[0][0]


def relative_positions(b, s, t) -> str:
    """rel[i, j] = j - (i + T - S) [S, T] (int64): key j's offset from query i's position,
    bottom-right aligned as the IR's causal mask."""
    zero, one = b.const(0, DType.i64, "zero"), b.const(1, DType.i64, "one")
    i_ = b.add("Range", [zero, b.scalar_dim(s), one])
    j_ = b.add("Range", [zero, b.scalar_dim(t), one])
    pos = b.add("Add", [i_, b.add("Sub", [b.scalar_dim(t), b.scalar_dim(s)])])
    return b.add("Sub", [b.unsqueeze(j_, [0]), b.unsqueeze(pos, [1])])


def attention_std(b, node: Node) -> str:
    """softmax(scale·Q·Kᵀ [softcap] + alibi + bias, masked) · V with standard ops, in bhsd.

    GQA without repeating K/V: q [B, H, S, D] is viewed as [B, Hkv, G*S, D] (G = H/Hkv)
    so each group of query heads multiplies its one K/V head.
    """
    a = node.attrs
    dtype = out_dtype(node)
    layout = a["layout"]
    (bb, h, s, d), (hkv, t, dv) = attention_dims(node)
    q, k, v = (b.input(node, i, dtype) for i in range(3))
    if layout == "bshd":
        q, k, v = (b.add("Transpose", [x], perm=[0, 2, 1, 3]) for x in (q, k, v))
    scale = a["scale"] if a["scale"] is not None else 1.0 / math.sqrt(d)
    g = h // hkv
    if g > 1:
        q = b.add("Reshape", [q, b.reshape_target([bb, hkv, g * s, d])])
    scores = b.add("MatMul", [q, b.add("Transpose", [k], perm=[0, 1, 3, 2])])
    if g > 1:
        scores = b.add("Reshape", [scores, b.reshape_target([bb, h, s, t])])
    scores = b.add("Mul", [scores, b.const(scale, dtype, "scale")])
    if a["softcap"] is not None:
        cap = b.const(a["softcap"], dtype, "softcap")
        scores = b.add("Mul", [b.add("Tanh", [b.add("Div", [scores, cap])]), cap])
    rel = None
    if a["alibi"] is not None or a["causal"] or a["window"] is not None:
        rel = relative_positions(b, s, t)  # [S, T]
    if a["alibi"] is not None:
        slopes = b.const(torch.tensor(a["alibi"]).reshape(h, 1, 1), dtype, "slopes")
        scores = b.add("Add", [scores, b.add("Mul", [slopes, b.cast(rel, DType.i64, dtype)])])
    bias = node.inputs[3] if len(node.inputs) > 3 else None
    kpm = node.inputs[4] if len(node.inputs) > 4 else None
    if bias is not None:
        scores = b.add("Add", [scores, b.input(node, 3, dtype)])
    neg_inf = b.const(float("-inf"), dtype, "neg_inf")
    masked = False
    if a["causal"] or a["window"] is not None:
        zero = b.const(0, DType.i64, "zero")
        keep = b.add("LessOrEqual", [rel, zero]) if a["causal"] else None
        if a["window"] is not None:
            win = b.add("Greater", [rel, b.const(-a["window"], DType.i64, "window")])
            keep = win if keep is None else b.add("And", [keep, win])
        scores = b.add("Where", [keep, scores, neg_inf])
        masked = True
    if kpm is not None:
        keep = b.add("Reshape", [b.input(node, 4, DType.bool), b.reshape_target([bb, 1, 1, t])])
        scores = b.add("Where", [keep, scores, neg_inf])
        masked = True
    probs = b.add("Softmax", [scores], axis=-1)
    if masked:  # a row whose every key is masked gives zeros, not NaN
        dead = b.add("Equal", [b.reduce("ReduceMax", scores, [-1], True), neg_inf])
        probs = b.add("Where", [dead, b.const(0.0, dtype, "zero"), probs])
    if g > 1:
        probs = b.add("Reshape", [probs, b.reshape_target([bb, hkv, g * s, t])])
    out = b.add("MatMul", [probs, v])
    if g > 1:
        out = b.add("Reshape", [out, b.reshape_target([bb, h, s, dv])])
    if layout == "bshd":
        out = b.add("Transpose", [out], perm=[0, 2, 1, 3])
    return out
