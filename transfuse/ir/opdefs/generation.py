"""Generation ops: ``cached_attention``, attention that reads and writes a KV cache in place.

One step of a generation graph runs the new tokens of B sequences as one flattened
token axis of N tokens (GEN_DESIGN.md). Every layer's ``cached_attention`` first
writes its new K/V rows into that layer's cache, then lets each token attend over
the visible part of its own sequence's cache. The op mutates inputs 3 and 4
(``k_cache``, ``v_cache``): its OpDef says so (``mutates=(3, 4)``), so cleanup
passes never drop, merge or fold it.

Glossary: N tokens of the step, B sequences of the step, H query heads, Hkv key/value
heads, D head dim, Dv value head dim, L cache length per slot (contiguous), P blocks in
the pool and K block size (paged), W blocks per sequence in the block table.

Cache layouts (attribute ``paged`` and ``cache_order``):

- contiguous, token-major: ``[slots, L, Hkv, D]``; head-major: ``[slots, Hkv, L, D]``;
- paged, token-major: ``[P, K, Hkv, D]``; head-major: ``[P, Hkv, K, D]``.
"""

from __future__ import annotations

import math

import torch

from transfuse.ir.opdef import Attr, default_bytes, register
from transfuse.ir.opdefs._util import in_type
from transfuse.ir.opdefs.nn import attention_attrs_reason, attention_output_types
from transfuse.ir.types import DType, TensorType, dim_str, dims_equal

INPUTS = ("q", "k", "v", "k_cache", "v_cache", "position_ids", "seq_of_token", "seq_lens",
          "cache_table")
LAYOUTS = ("bhsd", "bshd")
CACHE_ORDERS = ("token-major", "head-major")
#: inputs the op writes in place
MUTATED = (3, 4)


def heads_tokens(t: TensorType, layout: str) -> tuple:
    """(batch, heads, tokens, head dim) of a q/k/v type in ``layout``."""
    b, x1, x2, d = t.shape
    return (b, x2, x1, d) if layout == "bshd" else (b, x1, x2, d)


def cache_dims(t: TensorType, order: str) -> tuple:
    """(slots or blocks, length or block size, Hkv, D) of a cache type in ``order``."""
    a, x1, x2, d = t.shape
    return (a, x2, x1, d) if order == "head-major" else (a, x1, x2, d)


def _verify(node) -> str | None:
    a = node.attrs
    if a["layout"] not in LAYOUTS:
        return f"cached_attention: layout must be one of {LAYOUTS}, got {a['layout']!r}"
    if a["cache_order"] not in CACHE_ORDERS:
        return (f"cached_attention: cache_order must be one of {CACHE_ORDERS}, "
                f"got {a['cache_order']!r}")
    q, k, v, kc, vc, pos, sot, lens, table = (in_type(node, i) for i in range(9))
    for name, t in (("q", q), ("k", k), ("v", v), ("k_cache", kc), ("v_cache", vc)):
        if t.rank != 4:
            return f"cached_attention: {name} must be 4-D, got {t}"
    b, h, n, d = heads_tokens(q, a["layout"])
    bk, hk, nk, dk = heads_tokens(k, a["layout"])
    bv, hv, nv, dv = heads_tokens(v, a["layout"])
    if not all(dims_equal(x, 1) for x in (b, bk, bv)):
        return f"cached_attention: the batch dim of q/k/v must be 1 (flattened tokens): {q}"
    if not (dims_equal(n, nk) and dims_equal(n, nv) and dims_equal(d, dk)):
        return f"cached_attention: q/k/v token counts or head dims differ: {q}, {k}, {v}"
    if not (isinstance(h, int) and isinstance(hk, int)) or h % hk or not dims_equal(hk, hv):
        return f"cached_attention: heads {dim_str(h)} not a multiple of kv heads {dim_str(hk)}"
    order = a["cache_order"]
    ks, kl, kh, kd = cache_dims(kc, order)
    vs, vl, vh, vd = cache_dims(vc, order)
    if not (dims_equal(kh, hk) and dims_equal(kd, dk) and dims_equal(vh, hv)
            and dims_equal(vd, dv) and dims_equal(ks, vs) and dims_equal(kl, vl)):
        return (f"cached_attention: caches {kc}, {vc} ({order}) do not hold {dim_str(hk)} "
                f"kv heads of k's head dim {dim_str(dk)} / v's {dim_str(dv)}")
    if kc.dtype != k.dtype or vc.dtype != v.dtype:
        return f"cached_attention: cache dtypes {kc.dtype}/{vc.dtype} differ from k/v {k.dtype}"
    for name, t, rank in (("position_ids", pos, 1), ("seq_of_token", sot, 1),
                          ("seq_lens", lens, 1)):
        if t.dtype != DType.i64 or t.rank != rank:
            return f"cached_attention: {name} must be i64 [{'N' if rank else ''}], got {t}"
    if not (dims_equal(pos.shape[0], n) and dims_equal(sot.shape[0], n)):
        return f"cached_attention: position_ids {pos} / seq_of_token {sot} must have N = {n}"
    want = 2 if a["paged"] else 1
    if table.dtype != DType.i64 or table.rank != want or not dims_equal(table.shape[0],
                                                                       lens.shape[0]):
        form = "[B, W] block table" if a["paged"] else "[B] slot table"
        return f"cached_attention: cache_table must be an i64 {form} matching seq_lens, got {table}"
    if a["paged"] and (a["block_size"] is None or not dims_equal(kl, a["block_size"])):
        return (f"cached_attention: paged caches {kc} have blocks of {dim_str(kl)} tokens, "
                f"block_size={a['block_size']}")
    return attention_attrs_reason(node, hk, h)


def _cost(node):
    """Flops of attending over at most L (contiguous) cache entries per token."""
    _, h, n, d = heads_tokens(in_type(node, 0), node.attrs["layout"])
    slots, length, _, _ = cache_dims(in_type(node, 3), node.attrs["cache_order"])
    visible = node.attrs["window"] or (length if not node.attrs["paged"] else slots * length)
    return 4 * h * n * visible * d, default_bytes(node)


# -- the semantics, shared with the python lowering ---------------------------------


def token_major(cache: torch.Tensor, order: str) -> torch.Tensor:
    """A [slots|blocks, L|K, Hkv, D] view of a cache stored in ``order`` (writes go through)."""
    return cache.transpose(1, 2) if order == "head-major" else cache


def write_cache(cache: torch.Tensor, new: torch.Tensor, position_ids: torch.Tensor,
                seq_of_token: torch.Tensor, cache_table: torch.Tensor,
                block_size: int | None) -> None:
    """Write ``new`` ([N, Hkv, D]) into a token-major ``cache`` view at each token's slot.

    Contiguous (``block_size`` None): ``cache[table[s], p] = new[t]``; paged:
    ``cache[table[s, p // K], p % K] = new[t]``, for s = seq_of_token[t], p = position_ids[t].
    """
    if block_size is None:
        cache[cache_table[seq_of_token], position_ids] = new
    else:
        blocks = cache_table[seq_of_token, position_ids // block_size]
        cache[blocks, position_ids % block_size] = new


def _visible(cache: torch.Tensor, table_row: torch.Tensor, length: int,
             block_size: int | None) -> torch.Tensor:
    """The first ``length`` entries ([length, Hkv, D]) of one sequence's token-major cache."""
    if block_size is None:
        return cache[table_row, :length]
    nblocks = -(-length // block_size)
    rows = cache[table_row[:nblocks]]  # [W', K, Hkv, D]
    return rows.reshape(-1, *cache.shape[2:])[:length]


@register("cached_attention", INPUTS,
          {"scale": Attr("float?", None), "window": Attr("int?", None),
           "kv_heads": Attr("int?", None), "alibi": Attr("floats?", None),
           "softcap": Attr("float?", None), "layout": Attr("str", "bhsd"),
           "paged": Attr("bool", False), "block_size": Attr("int?", None),
           "cache_order": Attr("str", "token-major")},
          infer=attention_output_types, verify=_verify, cost=_cost, mutates=MUTATED)
def cached_attention(xs, attrs, env):
    """Write the step's K/V into the caches in place, then attend over each sequence's cache.

    Token t of sequence s = seq_of_token[t] at position p = position_ids[t] sees the
    cache entries j of s with max(0, p - window + 1) <= j <= p; scores are
    ``scale·q·k_j`` (``softcap·tanh(scores / softcap)``), plus ``slope_h·(j - p)`` with
    ALiBi; query head h reads kv head h // (H / Hkv). The reference: one token at a time.
    """
    q, k, v, kc, vc, pos, sot, lens, table = xs
    layout, order = attrs["layout"], attrs["cache_order"]
    if layout == "bshd":
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    bs = attrs["block_size"] if attrs["paged"] else None
    kc_t, vc_t = token_major(kc, order), token_major(vc, order)
    write_cache(kc_t, k[0].transpose(0, 1), pos, sot, table, bs)
    write_cache(vc_t, v[0].transpose(0, 1), pos, sot, table, bs)
    h, hkv, d = q.shape[1], k.shape[1], q.shape[3]
    scale = attrs["scale"] if attrs["scale"] is not None else 1.0 / math.sqrt(d)
    out = q.new_zeros(1, h, q.shape[2], v.shape[3])
    for t in range(q.shape[2]):
        s, p = int(sot[t]), int(pos[t])
        keys = _visible(kc_t, table[s], p + 1, bs).repeat_interleave(h // hkv, dim=1)
        vals = _visible(vc_t, table[s], p + 1, bs).repeat_interleave(h // hkv, dim=1)
        scores = torch.einsum("hd,jhd->hj", q[0, :, t], keys) * scale  # [H, p+1]
        if attrs["softcap"] is not None:
            scores = attrs["softcap"] * torch.tanh(scores / attrs["softcap"])
        j = torch.arange(p + 1, device=q.device)
        if attrs["alibi"] is not None:
            slopes = torch.tensor(attrs["alibi"], dtype=scores.dtype, device=q.device)
            scores = scores + slopes[:, None] * (j - p).to(scores.dtype)
        if attrs["window"] is not None:
            scores = scores.masked_fill(j <= p - attrs["window"], float("-inf"))
        out[0, :, t] = torch.einsum("hj,jhd->hd", torch.softmax(scores, dim=-1), vals)
    return out.transpose(1, 2) if layout == "bshd" else out


__all__ = ["INPUTS", "LAYOUTS", "CACHE_ORDERS", "MUTATED", "cached_attention", "cache_dims",
           "heads_tokens", "token_major", "write_cache"]
