"""Noise-filled KV caches for the decode and prefill attention kernel tests."""

from __future__ import annotations

import torch

#: contiguous slot length: longer than any test sequence
SLOT_LEN = 40


def make_cache(kind: str, hkv: int, d: int, dv: int | None, dtype: torch.dtype, lens,
               seed: int = 0):
    """(k_cache, v_cache, cache_table, paged, order) for ``len(lens)`` sequences of these
    lengths, filled with noise everywhere, so a read past a sequence's length or outside its
    blocks changes the answer. ``kind``: ``contig-token``, ``contig-head``, ``contig-noslots``
    (no table: slot b) or ``paged<K>-token`` / ``paged<K>-head`` (-1 past each sequence's
    blocks, as the runtime pads)."""
    g = torch.Generator().manual_seed(seed)
    b = len(lens)
    dv = d if dv is None else dv
    layout, order = kind.split("-")
    order = {"token": "token-major", "head": "head-major", "noslots": "token-major"}[order]
    if layout == "contig":
        if max(lens) > SLOT_LEN:
            raise ValueError(f"sequences of up to {max(lens)} tokens need longer slots")
        a, length = b + 2, SLOT_LEN
        table = None if kind == "contig-noslots" else torch.randperm(a, generator=g)[:b]
    else:
        length = int(layout.removeprefix("paged"))
        w = -(-max(lens) // length) + 1
        a = b * w + 3
        perm = torch.randperm(a, generator=g)[: b * w].reshape(b, w)
        table = torch.full((b, w), -1, dtype=torch.int64)
        for s, n in enumerate(lens):
            table[s, : -(-n // length)] = perm[s, : -(-n // length)]

    def cache(dim):
        shape = (a, length, hkv, dim) if order == "token-major" else (a, hkv, length, dim)
        return torch.randn(shape, generator=g).to(dtype)

    return cache(d), cache(dv), table, layout != "contig", order
