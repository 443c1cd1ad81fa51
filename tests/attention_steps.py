"""One generation step's attention inputs, shared by the cached_attention tests of the IR
(tests/ir/test_cached_attention.py) and of the onnxruntime lowering
(tests/codegen/test_onnx_generation.py).

A step is several sequences, sequence ``s`` bringing ``counts[s]`` new tokens from position
``starts[s]``, flattened into one token axis of N = sum(counts) tokens (GEN_DESIGN order).
Glossary: H query heads, Hkv kv heads, N step tokens, D head dim."""

from __future__ import annotations

import torch


def step_inputs(starts, counts, gen: torch.Generator, *, heads: int, kv_heads: int,
                head_dim: int, layout: str = "bhsd"):
    """(q, k, v, position_ids [N], seq_of_token [N], seq_lens [B]) of one step; q [1, H, N, D]
    and k, v [1, Hkv, N, D] (bhsd) or [1, N, H|Hkv, D] (bshd), random from ``gen``."""
    n = sum(counts)
    pos = torch.cat([torch.arange(a, a + c) for a, c in zip(starts, counts)])
    sot = torch.cat([torch.full((c,), s) for s, c in enumerate(counts)])
    lens = torch.tensor([a + c for a, c in zip(starts, counts)])
    q = torch.randn(1, heads, n, head_dim, generator=gen)
    k, v = (torch.randn(1, kv_heads, n, head_dim, generator=gen) for _ in range(2))
    if layout == "bshd":
        q, k, v = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    return q, k, v, pos, sot, lens
