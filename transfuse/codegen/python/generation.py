"""Python emitter of ``cached_attention`` (``transfuse/ir/opdefs/generation.py``) and its kernel.

The generated code calls :func:`cached_attention_step` (helper ``_cached_attention``):

0. one fresh sequence (B = 1, positions 0..N-1, no ALiBi or softcap): causal attention over
   the step's own K/V (``cpu_attention.causal_attention``: the native kernel), after the write;
1. write: one ``index_put_`` per cache puts the step's N new K/V rows at their slots
   (contiguous: ``cache[table[s], p]``; paged: ``cache[table[s, p // K], p % K]``);
2. read: the step's tokens are laid out on a [B, S] grid (S: the most new tokens of one
   sequence; a decode-only step has S = 1), each sequence's visible cache prefix is
   gathered once ([B, T, Hkv, D], T the longest sequence after the step; a view when the
   contiguous slots are in order) and one batched
   ``F.scaled_dot_product_attention`` runs with a position mask (j <= p, window) and
   ``enable_gqa`` (no materialised K/V repeats). ALiBi adds ``slope·(j - p)`` to the mask;
   softcap (no SDPA hook) takes the explicit matmul-softmax path, grouped for GQA.

Glossary: N step tokens, B step sequences, S new tokens per sequence (grid rows), T
visible cache length, H query heads, Hkv kv heads, G = H / Hkv, D head dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from transfuse.codegen.python.cpu_attention import causal_attention
from transfuse.codegen.python.registry import LOWERINGS
from transfuse.ir.opdefs.generation import token_major, write_cache


def _write(cache: torch.Tensor, new: torch.Tensor, position_ids, seq_of_token, cache_table,
           block_size: int | None) -> None:
    """``write_cache``; one token (decode of one sequence) is a plain copy into its row."""
    if new.shape[0] == 1:
        p = int(position_ids[0])
        if block_size is None:
            cache[int(cache_table[0]), p].copy_(new[0])
        else:
            cache[int(cache_table[0, p // block_size]), p % block_size].copy_(new[0])
        return
    write_cache(cache, new, position_ids, seq_of_token, cache_table, block_size)


def _gather_visible(cache: torch.Tensor, table: torch.Tensor, slots: list[int] | None,
                    length: int, block_size: int | None) -> torch.Tensor:
    """[B, T, Hkv, D]: the first ``length`` entries of each sequence's token-major cache
    (``slots``: the contiguous table as a list)."""
    if block_size is None:
        first = slots[0]
        if slots == list(range(first, first + len(slots))):
            return cache[first:first + len(slots), :length]  # slots in order: a view
        return cache[table, :length]
    nblocks = -(-length // block_size)
    blocks = table[:, :nblocks].clamp_min(0)  # -1 padding: masked by position below
    rows = cache[blocks]  # [B, W', K, Hkv, D]
    return rows.reshape(rows.shape[0], -1, *cache.shape[2:])[:, :length]


def cached_attention_step(q, k, v, k_cache, v_cache, position_ids, seq_of_token, seq_lens,
                          cache_table, scale, window, alibi, softcap, layout, block_size,
                          cache_order):
    """The kernel behind the ``cached_attention`` emitter (arguments as the op's, attrs after).

    q [1, H, N, D], k/v [1, Hkv, N, D] ("bhsd"; "bshd" transposed); returns [1, H, N, Dv]
    in the input layout. Writes the caches in place first.
    """
    if layout == "bshd":
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    kc, vc = token_major(k_cache, cache_order), token_major(v_cache, cache_order)
    _write(kc, k[0].transpose(0, 1), position_ids, seq_of_token, cache_table, block_size)
    _write(vc, v[0].transpose(0, 1), position_ids, seq_of_token, cache_table, block_size)
    h, n, d = q.shape[1], q.shape[2], q.shape[3]
    lens = seq_lens.tolist()
    b, t = len(lens), max(lens)
    if b == 1 and t == n and alibi is None and softcap is None:
        # one fresh sequence (positions 0..N-1): causal attention over the step's own K/V
        out = causal_attention(q, k, v, scale, enable_gqa=k.shape[1] != h, window=window)
        return out.transpose(1, 2) if layout == "bshd" else out
    slots = cache_table.tolist() if block_size is None else None
    keys = _gather_visible(kc, cache_table, slots, t, block_size).transpose(1, 2)  # [B,Hkv,T,D]
    vals = _gather_visible(vc, cache_table, slots, t, block_size).transpose(1, 2)
    qt = q[0].transpose(0, 1)  # [N, H, D]
    if b == n:  # decode-only: every token is its own sequence, in order
        rows = None
        grid_q = qt.unsqueeze(1)  # [B, 1, H, D]
        grid_pos = position_ids.unsqueeze(1)  # [B, 1]
    else:
        counts = torch.bincount(seq_of_token, minlength=b)
        starts = torch.cumsum(counts, 0) - counts
        rows = torch.arange(n, device=q.device) - starts[seq_of_token]
        s = int(counts.max())
        grid_q = q.new_zeros(b, s, h, d)
        grid_q[seq_of_token, rows] = qt
        grid_pos = position_ids.new_zeros(b, s)  # padding rows sit at 0 and see key 0
        grid_pos[seq_of_token, rows] = position_ids
    mask = None
    # a decode step whose sequences all end at T sees every key (no window cut): no mask
    every_key = (rows is None and all(x == t for x in lens) and alibi is None
                 and (window is None or t <= window)
                 and position_ids.tolist() == [t - 1] * b)
    if not every_key:
        j = torch.arange(t, device=q.device)
        rel = j[None, None, :] - grid_pos[:, :, None]  # [B, S, T]: j - p
        keep = rel <= 0
        if window is not None:
            keep &= rel > -window
        mask = keep[:, None]  # [B, 1, S, T]
        if alibi is not None:
            slopes = torch.tensor(alibi, dtype=q.dtype, device=q.device)
            bias = slopes[None, :, None, None] * rel[:, None].to(q.dtype)  # [B, H, S, T]
            mask = bias.masked_fill(~mask, float("-inf"))
    gq = grid_q.transpose(1, 2)  # [B, H, S, D]
    if softcap is None:
        out = F.scaled_dot_product_attention(gq, keys, vals, attn_mask=mask, scale=scale,
                                             enable_gqa=keys.shape[1] != h)
    else:
        out = _softcap_attention(gq, keys, vals, mask, scale, softcap)
    out = out.transpose(1, 2)  # [B, S, H, Dv]
    flat = out[:, 0] if rows is None else out[seq_of_token, rows]  # [N, H, Dv]
    flat = flat.transpose(0, 1).unsqueeze(0)  # [1, H, N, Dv]
    return flat.transpose(1, 2) if layout == "bshd" else flat


def _softcap_attention(q, k, v, mask, scale, softcap):
    """softmax(softcap·tanh(scale·q·kᵀ / softcap) + mask)·v, GQA by grouping query heads."""
    b, h, s, d = q.shape
    hkv, t = k.shape[1], k.shape[2]
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    qg = q.reshape(b, hkv, h // hkv, s, d)  # [B, Hkv, G, S, D]
    scores = torch.matmul(qg, k[:, :, None].transpose(-2, -1)) * scale  # [B, Hkv, G, S, T]
    scores = softcap * torch.tanh(scores / softcap)
    if mask is None:
        pass
    elif mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask.reshape(b, 1, 1, s, t), float("-inf"))
    else:
        scores = scores + mask.reshape(b, hkv, h // hkv, s, t)
    out = torch.matmul(torch.softmax(scores, dim=-1), v[:, :, None])
    return out.reshape(b, h, s, v.shape[-1])


@LOWERINGS.register("cached_attention")
def _cached_attention(ctx, node):
    """A call of ``_cached_attention`` with the op's attributes as literals."""
    a = node.attrs
    args = [ctx.name(x) for x in node.inputs]
    args += [ctx.lit(a["scale"]), ctx.lit(a["window"]), ctx.lit(a["alibi"]),
             ctx.lit(a["softcap"]), ctx.lit(a["layout"]),
             ctx.lit(a["block_size"] if a["paged"] else None), ctx.lit(a["cache_order"])]
    return f"{ctx.helper('_cached_attention')}({', '.join(args)})"


__all__ = ["cached_attention_step"]
