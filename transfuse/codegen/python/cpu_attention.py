"""Causal self-attention on the CPU in query blocks, so masked-out work is skipped.

Glossary: B batch, H query heads, Hkv key/value heads, S query length == key length,
D head dim, C the query block (:data:`BLOCK`).

torch's CPU flash-attention kernel with ``is_causal=True`` walks keys in blocks of
512, so below a few thousand tokens it computes nearly the whole S x S score matrix
and masks half of it (measured on one EPYC core, H=12, Hkv=4, D=64, S=512: causal
12.6 ms, no mask at all 11.7 ms). Splitting the queries into blocks of C and giving
block i only the keys it may see (the first (i+1)·C) does about half the work:
S=512 9.3 vs 12.3 ms, S=1024 31 vs 36 ms, S=128 0.84 vs 0.91 ms (queries as the
model has them: transposed views of [B, S, H, D]).

Each block is one ``scaled_dot_product_attention`` call with the block's slice of a
causal additive mask (0 / -inf; built once per dtype and device, grown on demand,
sliced as a view). Every query row still attends over exactly the keys the causal
mask allows, with the same fp32 softmax, so results match the single call to
rounding (max abs difference ~4e-7 on the case above).

fp32 on the CPU goes first to the native kernel (``native/ops.py``: scores of blocks of
6 query rows over only their visible key tiles, kept in L1; 0.56-0.74x the time of the
blocked SDPA path below at S = 128 .. 1024); what it does not take (other dtypes, head
dims not a multiple of 16, no C compiler) comes here.

Used by the python backend for square causal attention without other masks; other
devices (CUDA's kernels skip masked tiles themselves), sequences shorter than
:data:`MIN_SEQ` or longer than :data:`MAX_SEQ`, and anything else go to
``F.scaled_dot_product_attention(..., is_causal=True)``.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from transfuse.codegen.native import ops as native_ops
from transfuse.ir.opdefs.nn import attention_mask

#: queries per block: measured best of 32 / 48 / 64 / 96 / 128 on S = 128 .. 1024 with the
#: model's q/k/v layout (H=12, Hkv=4, D=64; S=512: 9.3 / 9.8 / 10.2 / 9.7 / 10.3 ms)
BLOCK = 32
#: below this the kernel's own causal path is as fast (S=128 blocked: 0.84 vs 0.91 ms)
MIN_SEQ = 128
#: the cached mask is MAX_SEQ^2 elements at most (64 MB in fp32); longer sequences go to the
#: kernel's own causal path, whose 512-key blocks are fine-grained enough at that length
MAX_SEQ = 4096

#: (dtype, device) -> the additive causal mask of :func:`causal_mask`, grown on demand
MASK_CACHE: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


@functools.lru_cache(maxsize=8)
def _window_mask(s: int, t: int, window: int, device: torch.device) -> torch.Tensor:
    return attention_mask(s, t, True, window, device)


def causal_mask(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An additive causal mask [m, m] with m >= n (0 on and below the diagonal, -inf above);
    any top-left [a:b, :c] slice of it is the causal mask of those rows and columns."""
    key = (dtype, device)
    mask = MASK_CACHE.get(key)
    if mask is None or mask.shape[0] < n:
        size = min(max(n, 2 * mask.shape[0] if mask is not None else 1024), max(n, MAX_SEQ))
        mask = torch.full((size, size), float("-inf"), dtype=dtype, device=device).triu_(1)
        MASK_CACHE[key] = mask
    return mask


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     scale: float | None = None, enable_gqa: bool = False,
                     window: int | None = None) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, is_causal=True, ...)`` for q, k, v [B, H, S, D]
    (k, v with Hkv heads when ``enable_gqa``), computed in query blocks on the CPU.

    ``window``: query i also sees no key j with i - j >= window (sliding window, as the IR's
    attention op defines it); only the native kernel computes it blocked, otherwise SDPA
    gets the boolean mask."""
    out = None
    if k.shape[1] == q.shape[1] or enable_gqa:
        out = native_ops.attention(q, k, v, scale, window)
    if out is not None:
        return out
    s = q.shape[-2]
    if window is not None:
        keep = _window_mask(s, k.shape[-2], window, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale,
                                              enable_gqa=enable_gqa)
    if (q.device.type != "cpu" or not MIN_SEQ <= s <= MAX_SEQ or k.shape[-2] != s
            or q.dim() != 4):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                              enable_gqa=enable_gqa)
    mask = causal_mask(s, q.dtype, q.device)
    blocks = []
    for start in range(0, s, BLOCK):
        end = min(start + BLOCK, s)
        o = F.scaled_dot_product_attention(
            q[:, :, start:end], k[:, :, :end], v[:, :, :end], attn_mask=mask[start:end, :end],
            scale=scale, enable_gqa=enable_gqa)
        blocks.append(o.transpose(1, 2))  # [B, C, H, D]: the kernel's own memory order
    # one [B, S, H, D] tensor, presented as [B, H, S, D] like SDPA's result
    return torch.cat(blocks, dim=1).transpose(1, 2)


__all__ = ["causal_attention", "causal_mask", "BLOCK", "MIN_SEQ", "MAX_SEQ"]
