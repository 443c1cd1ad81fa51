"""aten nn ops: embedding, layer_norm, rms_norm, scaled_dot_product_attention.

Glossary for attention: B batch, H heads, Hkv kv heads, S query length, T key length, D head dim.
"""

from __future__ import annotations

import math

import torch

from transfuse.frontend.aten.helpers import uses_outputs
from transfuse.frontend.aten.registry import FALLBACK, aten
from transfuse.ir.types import DType, dims_equal


@aten("embedding")
def _embedding(cx, a):
    return cx.op("embedding", cx.value(a["weight"]), cx.value(a["indices"]))


@aten("layer_norm")
def _layer_norm(cx, a):
    w = cx.value(a["weight"]) if a["weight"] is not None else None
    b = cx.value(a["bias"]) if a["bias"] is not None else None
    return cx.op(
        "layer_norm",
        cx.value(a["input"]),
        w,
        b,
        eps=float(a["eps"]),
        normalized_ndim=len(a["normalized_shape"]),
    )


@aten("native_layer_norm")
def _native_layer_norm(cx, a):
    if uses_outputs(cx.current, {1, 2}):
        return FALLBACK  # mean / rstd are not IR values
    return [_layer_norm(cx, a), None, None]


@aten("rms_norm")
def _rms_norm(cx, a):
    x = cx.value(a["input"])
    if x.dtype not in (DType.f32, DType.f64):
        return FALLBACK  # torch multiplies by the weight before casting back; IR casts first
    eps = a["eps"] if a["eps"] is not None else torch.finfo(x.dtype.torch).eps
    w = cx.value(a["weight"]) if a["weight"] is not None else None
    return cx.op(
        "rms_norm", x, w, eps=float(eps), normalized_ndim=len(a["normalized_shape"]), upcast=True
    )


@aten("scaled_dot_product_attention")
def _sdpa(cx, a):
    """SDPA -> ``attention`` when representable: bool masks become an additive bias,
    ``is_causal`` becomes ``causal`` only when S == T (SDPA aligns top-left, the IR
    bottom-right), ``enable_gqa`` with Hkv < H, or a single K/V head (broadcast), becomes
    ``kv_heads``."""
    q, k, v = (cx.value(a[n]) for n in ("query", "key", "value"))
    if any(t.type.rank != 4 for t in (q, k, v)) or a["dropout_p"] != 0:
        return FALLBACK
    causal, mask = bool(a["is_causal"]), a["attn_mask"]
    h, hkv = q.shape[1], k.shape[1]
    if (causal and mask is not None) or not (isinstance(h, int) and isinstance(hkv, int)):
        return FALLBACK
    kv_heads = None
    if hkv != h:
        # one K/V head broadcasts over the query heads by matmul's batch broadcasting (MQA,
        # Falcon); other counts need enable_gqa
        if not (a["enable_gqa"] or hkv == 1) or h % hkv or v.shape[1] != hkv:
            return FALLBACK
        kv_heads = hkv
    if causal and not dims_equal(q.shape[2], k.shape[2]):
        return FALLBACK
    scale = cx.scalar(a["scale"])
    if scale is not None and not isinstance(scale, (int, float)):
        return FALLBACK
    bias = None
    if mask is not None:
        m = cx.value(mask)
        if m.dtype == DType.bool:
            bias = cx.op("where", m, cx.const(0.0, q.dtype), cx.const(-math.inf, q.dtype))
        elif m.dtype == q.dtype:
            bias = m
        else:
            return FALLBACK
    return cx.op("attention", q, k, v, bias, causal=causal, scale=scale, kv_heads=kv_heads)
