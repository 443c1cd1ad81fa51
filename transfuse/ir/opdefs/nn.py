"""Fused Transformer ops: normalisations and attention.

Attention glossary: B batch, H query heads, Hkv key/value heads (H % Hkv == 0;
Hkv < H is GQA, Hkv == 1 MQA), S query length, T key length, D head dim,
Dv value head dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from transfuse.errors import IRVerifyError
from transfuse.ir.opdef import Attr, default_bytes, register
from transfuse.ir.opdefs._util import in_type
from transfuse.ir.types import TensorType, dim_str, dims_equal


def _opt(xs, i):
    return xs[i] if len(xs) > i else None


def _cost_norm(node):
    return 8 * in_type(node, 0).numel(), default_bytes(node)


# -- layer_norm / rms_norm -----------------------------------------------------


def _verify_norm(node):
    x = in_type(node, 0)
    nd = node.attrs["normalized_ndim"]
    if not 1 <= nd <= x.rank:
        return f"{node.op}: normalized_ndim {nd} out of range for {x}"
    for i in range(1, len(node.inputs)):
        v = node.inputs[i]
        if v is not None and not all(dims_equal(a, b) for a, b in
                                     zip(v.type.shape, x.shape[-nd:])) or (
                v is not None and v.type.rank != nd):
            return f"{node.op}: parameter {v.type} does not match normalized shape of {x}"
    if node.attrs["eps"] < 0:
        return f"{node.op}: eps must be >= 0"
    return None


@register("layer_norm", ["x", "weight?", "bias?"],
          {"eps": Attr("float", 1e-5), "normalized_ndim": Attr("int", 1)},
          infer=lambda n: [in_type(n, 0)], verify=_verify_norm, cost=_cost_norm)
def layer_norm(xs, attrs, env):
    """Layer normalisation over the last ``normalized_ndim`` dims."""
    x = xs[0]
    shape = x.shape[x.dim() - attrs["normalized_ndim"]:]
    return F.layer_norm(x, shape, _opt(xs, 1), _opt(xs, 2), attrs["eps"])


@register("rms_norm", ["x", "weight?"],
          {"eps": Attr("float", 1e-6), "normalized_ndim": Attr("int", 1),
           "offset": Attr("float", 0.0), "upcast": Attr("bool", True)},
          infer=lambda n: [in_type(n, 0)], verify=_verify_norm, cost=_cost_norm)
def rms_norm(xs, attrs, env):
    """x * rsqrt(mean(x², last dims) + eps) * (offset + weight).

    ``upcast``: compute the statistic in fp32 and cast back before the weight
    (Llama's form); ``offset`` is 1.0 for ``(1 + weight)`` variants (Gemma).
    """
    x, w = xs[0], _opt(xs, 1)
    dims = tuple(range(x.dim() - attrs["normalized_ndim"], x.dim()))
    h = x.float() if attrs["upcast"] else x
    h = h * torch.rsqrt(h.pow(2).mean(dims, keepdim=True) + attrs["eps"])
    h = h.to(x.dtype)
    if w is not None:
        h = h * (w + attrs["offset"]) if attrs["offset"] else h * w
    return h


# -- attention -------------------------------------------------------------------

_LAYOUTS = ("bhsd", "bshd")


def _to_bhsd(t: TensorType, layout: str):
    if layout == "bshd":
        b, s, h, d = t.shape
        return b, h, s, d
    return t.shape


def _verify_attention(node):
    a = node.attrs
    if a["layout"] not in _LAYOUTS:
        return f"attention: layout must be one of {_LAYOUTS}, got {a['layout']!r}"
    q, k, v = (in_type(node, i) for i in range(3))
    if q.rank != 4 or k.rank != 4 or v.rank != 4:
        return f"attention: q, k, v must be 4-D ({a['layout']}), got {q}, {k}, {v}"
    b, h, s, d = _to_bhsd(q, a["layout"])
    bk, hk, t, dk = _to_bhsd(k, a["layout"])
    bv, hv, tv, dv = _to_bhsd(v, a["layout"])
    if not (dims_equal(d, dk) and dims_equal(t, tv)):
        return f"attention: q/k head dims or k/v lengths differ: {q}, {k}, {v}"
    if not (isinstance(hk, int) and isinstance(h, int)) or h % hk or not dims_equal(hk, hv):
        return f"attention: heads {dim_str(h)} not a multiple of kv heads {dim_str(hk)}"
    return attention_attrs_reason(node, hk, h)


def attention_attrs_reason(node, kv_heads, heads) -> str | None:
    """Why ``node``'s kv_heads / window / alibi / softcap attrs are invalid for an attention
    with ``heads`` query and ``kv_heads`` key/value heads (also ``cached_attention``'s)."""
    a, op = node.attrs, node.op
    if a["kv_heads"] is not None and a["kv_heads"] != kv_heads:
        return f"{op}: kv_heads={a['kv_heads']} but k has {kv_heads} heads"
    if a["window"] is not None and a["window"] < 1:
        return f"{op}: window must be >= 1, got {a['window']}"
    if a["alibi"] is not None and len(a["alibi"]) != heads:
        return f"{op}: {len(a['alibi'])} alibi slopes for {heads} heads"
    if a["softcap"] is not None and a["softcap"] <= 0:
        return f"{op}: softcap must be > 0, got {a['softcap']}"
    return None


def attention_output_types(node):
    """q's type with v's head dim (``attention`` and ``cached_attention``)."""
    q, v = in_type(node, 0), in_type(node, 2)
    if q.rank != 4 or v.rank != 4:
        raise IRVerifyError(f"{node.op}: q and v must be 4-D, got {q}, {v}")
    shape = list(q.shape)
    shape[3] = v.shape[3]
    return [q.with_shape(shape)]


def _cost_attention(node):
    b, h, s, d = _to_bhsd(in_type(node, 0), node.attrs["layout"])
    t = _to_bhsd(in_type(node, 1), node.attrs["layout"])[2]
    return 4 * b * h * s * t * d, default_bytes(node)


def attention_mask(s: int, t: int, causal: bool, window: int | None,
                   device=None) -> torch.Tensor | None:
    """Boolean [S, T] mask (True = attend) for causal / sliding-window attention.

    Query i sits at absolute position i + (T - S) (bottom-right aligned, as with a KV cache);
    it sees key j when j <= pos (causal) and j > pos - window (window).
    """
    if not causal and window is None:
        return None
    pos = torch.arange(s, device=device)[:, None] + (t - s)
    j = torch.arange(t, device=device)[None, :]
    keep = torch.ones(s, t, dtype=torch.bool, device=device)
    if causal:
        keep &= j <= pos
    if window is not None:
        keep &= j > pos - window
    return keep


def alibi_bias(slopes, s: int, t: int, dtype, device=None) -> torch.Tensor:
    """[H, S, T] ALiBi bias: slope_h * (j - pos_i)."""
    pos = torch.arange(s, device=device)[:, None] + (t - s)
    j = torch.arange(t, device=device)[None, :]
    rel = (j - pos).to(dtype)
    return torch.tensor(slopes, dtype=dtype, device=device)[:, None, None] * rel


@register("attention", ["q", "k", "v", "bias?", "key_padding_mask?"],
          {"scale": Attr("float?", None), "causal": Attr("bool", False),
           "window": Attr("int?", None), "kv_heads": Attr("int?", None),
           "alibi": Attr("floats?", None), "softcap": Attr("float?", None),
           "layout": Attr("str", "bhsd")},
          infer=attention_output_types, verify=_verify_attention, cost=_cost_attention)
def attention(xs, attrs, env):
    """softmax(scale·Q·Kᵀ [softcap] + alibi + bias, masked) · V.

    ``bias`` broadcasts to [B, H, S, T] and is added to the scores;
    ``key_padding_mask`` is [B, T], nonzero = attend. Masked scores are -inf; a query
    row whose keys are all masked gives zeros (as SDPA does), not NaN.
    """
    q, k, v = xs[:3]
    bias, kpm = _opt(xs, 3), _opt(xs, 4)
    if attrs["layout"] == "bshd":
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    h, hkv = q.shape[1], k.shape[1]
    if hkv != h:
        k = k.repeat_interleave(h // hkv, dim=1)
        v = v.repeat_interleave(h // hkv, dim=1)
    s, t = q.shape[2], k.shape[2]
    scale = attrs["scale"] if attrs["scale"] is not None else 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    if attrs["softcap"] is not None:
        scores = attrs["softcap"] * torch.tanh(scores / attrs["softcap"])
    if attrs["alibi"] is not None:
        scores = scores + alibi_bias(attrs["alibi"], s, t, scores.dtype, scores.device)
    if bias is not None:
        scores = scores + bias
    keep = attention_mask(s, t, attrs["causal"], attrs["window"], scores.device)
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    if kpm is not None:
        scores = scores.masked_fill(~kpm.bool()[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if keep is not None or kpm is not None:
        probs = probs.masked_fill(torch.isneginf(scores).all(dim=-1, keepdim=True), 0.0)
    out = torch.matmul(probs, v)
    if attrs["layout"] == "bshd":
        out = out.transpose(1, 2)
    return out
