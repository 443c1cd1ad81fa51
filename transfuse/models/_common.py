"""What the reference models share: presets, seeded weight init, head splitting, and what
the causal models need to be generation-capable (default generation settings, the
key-padding mask).

Glossary: B batch, S sequence length, T key length, H heads, D head dim, E embed dim (H * D).
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

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


@dataclasses.dataclass
class GenerationDefaults:
    """A causal reference model's generation defaults (its ``generation_config``).

    The built-in models have no tokenizer, so there is no end-of-sequence token: ``eos``
    None means generation stops only at ``max_new_tokens``. Set fields on the model's
    ``generation_config`` to change its defaults; ``to_dict()`` is what ``generate()`` reads
    (the fields of Hugging Face's GenerationConfig it knows, without needing transformers).
    """

    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    max_new_tokens: int | None = None
    do_sample: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) 1 = real token, 0 = padding -> (B, 1, 1, T) bool, True where a key is padding.

    Scores of padding keys are filled with finfo.min, not -inf: a (left-)padding query sees
    only padding keys, and a finite fill keeps its row (unused) free of NaN, which would
    otherwise reach the real rows through the values in the next layer.
    """
    return (attention_mask == 0)[:, None, None, :]


class CausalLM(nn.Module):
    """Base of the causal reference models: what generation asks of a causal LM (its LM head
    ``lm_head``; ``generation_config``, a :class:`GenerationDefaults` the subclass sets)."""

    lm_head: nn.Linear

    def get_output_embeddings(self) -> nn.Linear:
        """The LM head (what a causal LM exposes to generation)."""
        return self.lm_head
