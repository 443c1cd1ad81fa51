"""ORT contrib attention: MultiHeadAttention and packed Attention (no past/present).

Glossary for attention: B batch, H heads, S query length, T key length, D head dim.
"""

from __future__ import annotations

from transfuse.frontend.build import to_shape
from transfuse.frontend.onnx_ops.helpers import weight_t
from transfuse.frontend.onnx_ops.registry import MS, onnx_op
from transfuse.ir.graph import Value


@onnx_op("MultiHeadAttention", domain=MS)
def _multi_head_attention(cx, node):
    """ORT's MultiHeadAttention without past/present and packing: q [B, S, H·D]; k, v
    [B, T, H·D] or [B, H, T, D]; key_padding_mask [B, T] (1 = attend) and attention_bias
    [B|1, H|1, S, T] become the additive bias; ``unidirectional`` is ``causal``."""
    if any(node.has_input(i) for i in (6, 7, 8, 9)) or node.used(1) or node.used(2):
        raise cx.unsupported("MultiHeadAttention with past/present key and value (KV cache)")
    if not (node.has_input(1) and node.has_input(2)):
        raise cx.unsupported("MultiHeadAttention with packed QKV / KV")
    heads = node.attr("num_heads")
    q = cx.value(node.input(0))
    k, v = cx.value(node.input(1)), cx.value(node.input(2))
    if q.type.rank != 3 or k.type.rank not in (3, 4) or v.type.rank != k.type.rank:
        raise cx.unsupported(f"MultiHeadAttention with q {q.type}, k {k.type}, v {v.type}")
    hd = q.shape[2]
    if node.has_input(3):
        if k.type.rank != 3:
            raise cx.unsupported("MultiHeadAttention bias with 4-D key/value")
        sizes = [hd, k.shape[2], v.shape[2]]
        bq, bk, bv = cx.emit("split", [cx.value(node.input(3))], {"axis": 0, "sizes": sizes})
        q, k, v = cx.op("add", q, bq), cx.op("add", k, bk), cx.op("add", v, bv)
    t = k.shape[1] if k.type.rank == 3 else k.shape[2]
    bias = None
    if node.has_input(4):
        m = cx.value(node.input(4))
        if m.type.rank != 2:
            raise cx.unsupported(f"MultiHeadAttention key_padding_mask of type {m.type} "
                                 "(only [B, T] is supported)")
        fill = float(node.attr("mask_filter_value", -10000.0))
        keep = cx.op("ne", m, cx.const(0, m.dtype))
        bias = cx.op("where", keep, cx.const(0.0, q.dtype), cx.const(fill, q.dtype))
        bias = to_shape(cx, bias, [m.shape[0], 1, 1, t])
    if node.has_input(5):
        ab = cx.value(node.input(5))
        bias = ab if bias is None else cx.op("add", bias, ab)
    out = _heads_attention(cx, q, k, v, heads, bias, node.attr("scale"),
                           bool(node.attr("unidirectional", 0)))
    return [out, None, None]


@onnx_op("Attention", domain=MS)
def _ms_attention(cx, node):
    """ORT's packed Attention without past: x [B, S, E] @ weights [E, Nq+Nk+Nv] + bias, split
    into q, k, v; ``mask_index`` [B] (key lengths, right padding) or [B, T] (1 = attend)
    becomes the additive bias (``mask_filter_value``); ``unidirectional`` is ``causal``."""
    if any(node.has_input(i) for i in (4, 6)) or node.used(1):
        raise cx.unsupported("Attention with past/present key and value (KV cache)")
    if node.attr("do_rotary", 0) or node.attr("past_present_share_buffer", 0):
        raise cx.unsupported("Attention with do_rotary / past_present_share_buffer")
    heads = node.attr("num_heads")
    x, w = cx.value(node.input(0)), cx.value(node.input(1))
    if x.type.rank != 3 or w.type.rank != 2:
        raise cx.unsupported(f"Attention with input {x.type} and weights {w.type}")
    total = w.shape[1]
    sizes = list(node.attr("qkv_hidden_sizes") or [total // 3] * 3)
    bias = cx.value(node.input(2)) if node.has_input(2) else None
    proj = cx.op("linear", x, weight_t(cx, w), bias) if w.is_const else \
        cx.op("matmul", x, w) if bias is None else cx.op("add", cx.op("matmul", x, w), bias)
    q, k, v = cx.emit("split", [proj], {"axis": 2, "sizes": sizes})
    b, s = x.shape[0], x.shape[1]
    mask = None
    if node.has_input(3):
        m = cx.value(node.input(3))
        fill = float(node.attr("mask_filter_value", -10000.0))
        if m.type.rank == 1:  # key lengths
            pos = cx.op("arange", start=0, end=s, step=1, dtype=m.dtype)
            keep = cx.op("lt", to_shape(cx, pos, [1, s]), to_shape(cx, m, [m.shape[0], 1]))
        elif m.type.rank == 2:
            keep = cx.op("ne", m, cx.const(0, m.dtype))
        else:
            raise cx.unsupported(f"Attention mask_index of type {m.type} (only [B] or [B, T])")
        mask = to_shape(cx, cx.op("where", keep, cx.const(0.0, x.dtype),
                                  cx.const(fill, x.dtype)), [b, 1, 1, keep.shape[-1]])
    if node.has_input(5):
        ab = cx.value(node.input(5))
        mask = ab if mask is None else cx.op("add", mask, ab)
    out = _heads_attention(cx, q, k, v, heads, mask, node.attr("scale"),
                           bool(node.attr("unidirectional", 0)))
    return [out, None]


def _heads_attention(cx, q: Value, k: Value, v: Value, heads: int, bias: Value | None,
                     scale: float | None, causal: bool) -> Value:
    """q [B, S, H·D], k/v [B, T, H·D] or [B, H, T, D] -> attention -> [B, S, H·Dv]."""
    b, s, hd = q.shape
    if not isinstance(hd, int) or not heads or hd % heads:
        raise cx.fail(f"hidden size {hd} is not a static multiple of num_heads={heads}")

    def heads_first(x: Value) -> Value:  # [B, L, H·D] -> [B, H, L, D]
        if x.type.rank == 4:
            return x
        y = to_shape(cx, x, [x.shape[0], x.shape[1], heads, x.shape[2] // heads])
        return cx.op("permute", y, perm=[0, 2, 1, 3])

    q4, k4, v4 = heads_first(q), heads_first(k), heads_first(v)
    out = cx.op("attention", q4, k4, v4, bias, scale=None if not scale else float(scale),
                causal=causal)
    out = cx.op("permute", out, perm=[0, 2, 1, 3])
    return to_shape(cx, out, [b, s, heads * v4.shape[3]])
