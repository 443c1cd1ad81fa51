"""Python emitter of ``cached_attention`` (``transfuse/ir/opdefs/generation.py``) and its kernel.

The generated code calls :func:`cached_attention_step` (helper ``_cached_attention``):

0. one fresh sequence (B = 1, positions 0..N-1, no ALiBi or softcap): causal attention over
   the step's own K/V (``cpu_attention.causal_attention``: the native kernel), after the write;
1. write: one ``index_copy_`` per cache puts the step's N new K/V rows at their rows
   (contiguous: ``cache[table[s], p]``; paged: ``cache[table[s, p // K], p % K]``), rows
   computed once per step for every layer (:class:`StepPlan`);
2. read: the step's tokens are laid out on a [B, S] grid (S: the most new tokens of one
   sequence; a decode-only step has S = 1), each sequence's visible cache prefix is
   gathered once ([B, T, Hkv, D], T the longest sequence after the step; a view when the
   contiguous slots are in order) and one batched
   ``F.scaled_dot_product_attention`` runs with a position mask (j <= p, window) and
   ``enable_gqa`` (no materialised K/V repeats); with a window, keys no query of the step
   can see (before the lowest position - window + 1) are not read. ALiBi adds ``slope·(j - p)`` to the mask;
   softcap (no SDPA hook) takes the explicit matmul-softmax path, grouped for GQA.

   fp32 on the CPU goes to the native kernel instead (``native/cached.py``,
   ``cached_attention.c``): each token's visible K/V rows are read where they lie in the
   cache (no gathered [B, T, Hkv, D] copy, no padded grid, no mask), with an online softmax
   per (token, head); every attribute form, both layouts and orders. The torch path above is
   the fallback (``TRANSFUSE_NATIVE=0``, other dtypes, head dims not a multiple of 8) and
   takes steps made of long chunks (:data:`DENSE_CHUNK`), where SDPA's GEMMs win.

Glossary: N step tokens, B step sequences, S new tokens per sequence (grid rows), T
visible cache length, H query heads, Hkv kv heads, G = H / Hkv, D head dim.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from transfuse.codegen.native.cached import cached_attention_read, token_runs
from transfuse.codegen.python.cpu_attention import causal_attention
from transfuse.codegen.python.registry import LOWERINGS
from transfuse.ir.opdefs.generation import token_major, write_cache

#: the native read computes each (token, head) on its own (dot products, online softmax): a
#: step whose [B, S] grid is at least half full with S >= DENSE_CHUNK new tokens per sequence
#: runs faster as SDPA's GEMMs on the gathered grid. Measured, 1 thread, native / torch time,
#: GPT-2 (12 heads) and SmolLM2 (9 q / 3 kv heads) x 64: one 256-token chunk after 256 cached
#: 1.68 / 1.49, 2 chunks of 128 1.35 / 1.25, 4 of 32 0.99 / 1.28, 4 of 16 0.44 / 1.13, 16
#: tokens alone 0.88 / 1.00, 8 alone 0.53 / 0.73; a 64-512 token chunk beside 7 decodes
#: 0.14-0.24 (the grid is mostly padding), decode steps 0.15-0.6 (B 1-16, T 64-1024, paged)
DENSE_CHUNK = 16


class StepPlan:
    """What every layer of one step shares, computed once: lengths, where each token's row
    is written, which cache rows each sequence reads, the [B, S] grid and the masks.

    Rows are indices into a cache viewed as [rows · L, Hkv, D] (token-major and contiguous
    in memory; other caches take the two-index path). :func:`plan_for` keeps the last plan
    and reuses it while the metadata that comes back is the same (its
    contents are equal), i.e. for every layer of a step.
    """

    def __init__(self, position_ids, seq_of_token, seq_lens, cache_table,
                 block_size: int | None, length: int):
        self.tensors = (position_ids, seq_of_token, seq_lens, cache_table)  # own copies
        self.length = length
        self.lens = seq_lens.tolist()
        self.min_position = int(position_ids.min())
        self.b, self.t, self.n = len(self.lens), max(self.lens), position_ids.shape[0]
        self.block_size = block_size
        dev = position_ids.device
        if block_size is None:
            self.slots = cache_table.tolist()
            first = self.slots[0]
            self.in_order = self.slots == list(range(first, first + self.b))
            self.write_rows = cache_table[seq_of_token] * length + position_ids
        else:
            self.slots, self.in_order = None, False
            blocks = cache_table[seq_of_token, position_ids // block_size]
            self.write_rows = blocks * block_size + position_ids % block_size
        self.decode = self.b == self.n  # every token its own sequence, in order
        if self.decode:
            self.rows = None
            self.grid_pos = position_ids.unsqueeze(1)  # [B, 1]
            self.every_key = (all(x == self.t for x in self.lens)
                              and position_ids.tolist() == [self.t - 1] * self.b)
        else:
            counts = torch.bincount(seq_of_token, minlength=self.b)
            starts = torch.cumsum(counts, 0) - counts
            self.rows = torch.arange(self.n, device=dev) - starts[seq_of_token]
            self.s = int(counts.max())
            self.grid_pos = position_ids.new_zeros(self.b, self.s)  # padding rows see key 0
            self.grid_pos[seq_of_token, self.rows] = position_ids
            self.every_key = False
        self.masks: dict = {}
        self._runs: torch.Tensor | None = None

    @functools.cached_property
    def read_rows(self) -> torch.Tensor:
        """[B, T]: the cache rows each sequence reads (the torch path's gather; the native
        read needs none, so it is made on first use)."""
        cache_table, length, bs = self.tensors[3], self.length, self.block_size
        j = torch.arange(self.t, device=cache_table.device)
        if bs is None:
            return cache_table[:, None] * length + j[None, :]
        table = cache_table[:, :-(-self.t // bs)].clamp_min(0)  # -1 padding: masked by position
        return table[:, j // bs] * bs + j % bs

    def native_first(self) -> bool:
        """Whether the native read should take this step (see :data:`DENSE_CHUNK`)."""
        return self.decode or self.s < DENSE_CHUNK or 2 * self.n < self.b * self.s

    def runs(self) -> torch.Tensor:
        """The native read's work split (:func:`token_runs`), made on first use."""
        if self._runs is None:
            self._runs = token_runs(self.tensors[1])
        return self._runs

    def matches(self, tensors, block_size, length) -> bool:
        """Whether this plan serves metadata ``tensors`` (equal contents: exact, whoever
        made them and whatever was written into them since)."""
        return (block_size == self.block_size and length == self.length
                and all(a.shape == b.shape and torch.equal(a, b)
                        for a, b in zip(tensors, self.tensors)))

    def mask(self, window, alibi, dtype):
        """None (every key visible), bool [B, 1, S, T], or ALiBi float [B, H, S, T]."""
        if self.every_key and alibi is None and (window is None or self.t <= window):
            return None
        key = (window, alibi, dtype)
        if key not in self.masks:
            j = torch.arange(self.t, device=self.grid_pos.device)
            rel = j[None, None, :] - self.grid_pos[:, :, None]  # [B, S, T]: j - p
            keep = rel <= 0
            if window is not None:
                keep &= rel > -window
            mask = keep[:, None]
            if alibi is not None:
                slopes = torch.tensor(alibi, dtype=dtype, device=rel.device)
                bias = slopes[None, :, None, None] * rel[:, None].to(dtype)  # [B, H, S, T]
                mask = bias.masked_fill(~mask, float("-inf"))
            self.masks[key] = mask
        return self.masks[key]


_LAST_PLAN: list[StepPlan] = []


def plan_for(position_ids, seq_of_token, seq_lens, cache_table, block_size,
             length) -> StepPlan:
    """The step's :class:`StepPlan`: the last one while the same metadata comes back."""
    tensors = (position_ids, seq_of_token, seq_lens, cache_table)
    if _LAST_PLAN and _LAST_PLAN[0].matches(tensors, block_size, length):
        return _LAST_PLAN[0]
    plan = StepPlan(*(x.clone() for x in tensors), block_size, length)
    _LAST_PLAN[:] = [plan]
    return plan


def _write(cache, new, plan: StepPlan, meta) -> None:
    """The step's rows into ``cache`` (token-major view), in place."""
    if cache.is_contiguous():
        cache.view(-1, *cache.shape[2:]).index_copy_(0, plan.write_rows, new)
    else:  # a head-major cache seen token-major: index both dims
        position_ids, seq_of_token, cache_table = meta
        write_cache(cache, new, position_ids, seq_of_token, cache_table, plan.block_size)


def _read(cache, plan: StepPlan, lo: int) -> torch.Tensor:
    """[B, T - lo, Hkv, D]: entries lo..T-1 of each sequence's cache (a view when the
    contiguous slots are in order)."""
    if plan.in_order:
        first = plan.slots[0]
        return cache[first:first + plan.b, lo:plan.t]
    if cache.is_contiguous():
        return cache.view(-1, *cache.shape[2:])[plan.read_rows[:, lo:]]
    _, _, seq_lens, cache_table = plan.tensors  # a head-major cache seen token-major
    if plan.block_size is None:
        return cache[cache_table, lo:plan.t]
    nblocks = -(-plan.t // plan.block_size)
    rows = cache[cache_table[:, :nblocks].clamp_min(0)]  # [B, W', K, Hkv, D]
    return rows.reshape(plan.b, -1, *cache.shape[2:])[:, lo:plan.t]


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
    plan = plan_for(position_ids, seq_of_token, seq_lens, cache_table, block_size, kc.shape[1])
    meta = (position_ids, seq_of_token, cache_table)
    _write(kc, k[0].transpose(0, 1), plan, meta)
    _write(vc, v[0].transpose(0, 1), plan, meta)
    h, n, d = q.shape[1], q.shape[2], q.shape[3]
    if plan.b == 1 and plan.t == n and alibi is None and softcap is None:
        # one fresh sequence (positions 0..N-1): causal attention over the step's own K/V
        out = causal_attention(q, k, v, scale, enable_gqa=k.shape[1] != h, window=window)
        return out.transpose(1, 2) if layout == "bshd" else out
    if plan.native_first():
        pos, sot, _, table = plan.tensors
        flat = cached_attention_read(q[0].transpose(0, 1), kc, vc, pos, sot, table,
                                     plan.runs(), scale=scale, window=window, alibi=alibi,
                                     softcap=softcap, block_size=block_size)
        if flat is not None:  # [N, H, Dv]
            return flat.unsqueeze(0) if layout == "bshd" else flat.transpose(0, 1).unsqueeze(0)
    # with a window, no query of the step sees a key before lo: those are not read
    lo = 0 if window is None else max(0, plan.min_position - window + 1)
    keys = _read(kc, plan, lo).transpose(1, 2)  # [B, Hkv, T - lo, D]
    vals = _read(vc, plan, lo).transpose(1, 2)
    qt = q[0].transpose(0, 1)  # [N, H, D]
    if plan.decode:
        grid_q = qt.unsqueeze(1)  # [B, 1, H, D]
    else:
        grid_q = q.new_zeros(plan.b, plan.s, h, d)
        grid_q[seq_of_token, plan.rows] = qt
    mask = plan.mask(window, alibi, q.dtype)
    if mask is not None and lo:
        mask = mask[..., lo:]  # padding rows of the grid may see no key: they are dropped
    gq = grid_q.transpose(1, 2)  # [B, H, S, D]
    if softcap is None:
        out = F.scaled_dot_product_attention(gq, keys, vals, attn_mask=mask, scale=scale,
                                             enable_gqa=keys.shape[1] != h)
    else:
        out = _softcap_attention(gq, keys, vals, mask, scale, softcap)
    out = out.transpose(1, 2)  # [B, S, H, Dv]
    flat = out[:, 0] if plan.rows is None else out[seq_of_token, plan.rows]  # [N, H, Dv]
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
