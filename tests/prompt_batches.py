"""Left-padded prompt batches (ids + attention mask) for the generation tests."""

from __future__ import annotations

import torch


def left_padded(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``prompts`` as one i64 [B, S] batch, shorter rows padded on the left with ``pad``,
    and the 0/1 mask of the real tokens."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[row, width - len(p):] = 1
    return ids, mask


def random_left_padded(lengths: list[int], *, high: int, pad: int,
                       seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts of ``lengths`` with ids in [1, high), as :func:`left_padded`."""
    g = torch.Generator().manual_seed(seed)
    return left_padded([torch.randint(1, high, (n,), generator=g).tolist() for n in lengths],
                       pad)
