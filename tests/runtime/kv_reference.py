"""Test helpers: the cached_attention op's write/read semantics in plain torch (the oracle),
and a small cache maker, a step runner and a state snapshot for the KVCache tests.

``write_step`` stores K/V of a step's tokens through a StepMeta exactly as the contract says
the op does; ``read_seq`` gathers one sequence's first ``length`` positions back out. They
index the cache tensors themselves, independent of KVCache's own bookkeeping.
"""

from __future__ import annotations

import torch

from transfuse.runtime.kv_cache import KVCache
from transfuse.runtime.step_meta import StepMeta


def _rows_cols(cache: KVCache, table_rows: torch.Tensor, positions: torch.Tensor):
    """Index pairs (cache row, column) of ``positions``; ``table_rows`` [T] or [T, max_blocks]."""
    if cache.paged:
        blocks = table_rows.gather(1, (positions // cache.block_size).unsqueeze(1)).squeeze(1)
        assert bool((blocks >= 0).all()), "a position falls in an unallocated (-1) block"
        return blocks, positions % cache.block_size
    return table_rows, positions


def _index(cache: KVCache, rows: torch.Tensor, cols: torch.Tensor):
    return (rows, cols) if cache.order == "token-major" else (rows, slice(None), cols)


def write_step(cache: KVCache, meta: StepMeta, layer: int, k: torch.Tensor, v: torch.Tensor):
    """k, v [N, Hkv, D]: token t goes to its sequence's position ``position_ids[0, t]``."""
    seq = meta.seq_of_token
    rows, cols = _rows_cols(cache, meta.cache_table[seq], meta.position_ids[0])
    if cache.paged:  # the op may assume every block it writes is owned by the writer
        for b in rows.unique().tolist():
            assert cache.ref_count(b) == 1, f"step writes shared block {b}"
    idx = _index(cache, rows, cols)
    cache.k[layer][idx] = k
    cache.v[layer][idx] = v


def table_row(cache: KVCache, seq_id) -> torch.Tensor:
    """The cache_table row of ``seq_id`` as prepare_step would give it."""
    if cache.paged:
        blocks = cache.block_table(seq_id)
        return torch.tensor(blocks + [-1] * (cache.max_blocks - len(blocks)))
    return torch.tensor(cache.slot(seq_id))


def read_seq(cache: KVCache, seq_id, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K, V [length, Hkv, D] of ``seq_id``'s cached positions 0..length-1."""
    n = cache.length(seq_id)
    positions = torch.arange(n)
    row = table_row(cache, seq_id)
    rows = row.expand(n, *row.shape) if cache.paged else row.expand(n)
    idx = _index(cache, *_rows_cols(cache, rows, positions))
    return cache.k[layer][idx], cache.v[layer][idx]


BOTH = [(lay, order) for lay in ("contiguous", "paged") for order in ("token-major", "head-major")]


def make(layout="paged", order="token-major", **kw):
    args = dict(max_seq_len=32, max_batch=4, layout=layout, order=order)
    if layout == "paged":
        args["block_size"] = 4
    args.update(kw)
    return KVCache(2, 2, 3, **args)


def step(cache, items, gen=None):
    """Run one step: prepare, write random K/V in every layer, commit; returns (meta, k, v)."""
    meta = cache.prepare_step(items)
    n = meta.num_tokens
    ks, vs = [], []
    for layer in range(cache.layers):
        k = torch.randn(n, cache.kv_heads, cache.head_dim, generator=gen).to(cache.device)
        v = torch.randn(n, cache.kv_heads, cache.head_dim, generator=gen).to(cache.device)
        write_step(cache, meta, layer, k, v)
        ks.append(k)
        vs.append(v)
    cache.commit_step()
    return meta, ks, vs


def state(cache):
    """Everything observable about the bookkeeping (for 'unchanged after an error')."""
    seqs = {s: (cache.length(s), cache.block_table(s) if cache.paged else cache.slot(s))
            for s in cache.seq_ids()}
    return seqs, cache.memory_report()
