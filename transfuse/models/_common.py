"""What the reference models share: presets, seeded weight init, head splitting.

Glossary: B batch, S sequence length, H heads, D head dim, E embed dim (H * D).
"""

from __future__ import annotations

import dataclasses
from typing import TypeVar

import torch
from torch import nn

C = TypeVar("C")
M = TypeVar("M", bound=nn.Module)


def config_from_preset(family: str, presets: dict[str, C], preset: str, **overrides) -> C:
    """Return a copy of `presets[preset]` with `overrides` applied to its fields.

    An unknown preset or field is a ValueError that names the valid choices.
    """
    if preset not in presets:
        raise ValueError(f"unknown {family} preset {preset!r}; choose one of {sorted(presets)}")
    fields = {f.name for f in dataclasses.fields(presets[preset])}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown {family} config field(s) {unknown}; valid: {sorted(fields)}")
    return dataclasses.replace(presets[preset], **overrides)


@torch.no_grad()
def init_weights(model: nn.Module, seed: int, std: float = 0.02) -> None:
    """Overwrite every parameter from a `torch.Generator` seeded with `seed`.

    Matrices (linear, embedding) draw from N(0, std); biases are zero; other 1-D
    weights (norm scales) are one. Parameters are visited in registration order and
    tied parameters once, so the same seed gives bit-identical weights whatever the
    global RNG state is.
    """
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if param.dim() >= 2:
            param.normal_(0.0, std, generator=generator)
        elif name.endswith("bias"):
            param.zero_()
        else:
            param.fill_(1.0)


def build(model_cls: type[M], config: object, seed: int) -> M:
    """Construct `model_cls(config)` on CPU with seeded weights, in eval mode.

    nn.Linear and friends draw their default init from the global RNG; that draw is
    wasted (init_weights overwrites it) and must not move the caller's RNG state.
    """
    with torch.random.fork_rng(devices=[]):
        model = model_cls(config)
    init_weights(model, seed)
    return model.eval()


def split_heads(x: torch.Tensor, n_head: int) -> torch.Tensor:
    """(B, S, H * D) -> (B, H, S, D)."""
    B, S, _ = x.shape
    return x.view(B, S, n_head, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, S, D) -> (B, S, H * D)."""
    B, H, S, D = x.shape
    return x.transpose(1, 2).reshape(B, S, H * D)
