"""GPT-2: a decoder-only Transformer with learned positions and a tied LM head.

Pre-norm blocks (LayerNorm -> attention -> residual, LayerNorm -> MLP -> residual),
GELU with the tanh approximation, separate q/k/v projections with biases, and
attention written out as plain math with a boolean causal mask applied by
masked_fill(-inf). The layout follows karpathy/nanoGPT.

The mask is built in forward from S rather than sliced from a (P, P) buffer as
nanoGPT does: a slice [:S, :S] of a buffer is contiguous only when S == P, and
torch.export guards on that, which breaks a dynamic seq dim reaching P.

Generation (``transfuse.optimize(model, (ids,), generation=...)``) captures the model
with ``position_ids`` (B, S), which index the learned position table in place of
0..S-1, and ``use_cache`` (accepted and ignored: the compiler puts the KV cache in the
graph). An optional ``attention_mask`` (B, T) hides padding keys. Without them the
computation is exactly the plain one. ``get_output_embeddings()`` is the LM head and
``generation_config`` the defaults of ``generate()`` (no EOS token).

Glossary: B batch, S query length, T key length (T == S here), H heads, D head
dim, E embed dim (H * D), V vocab size, P max positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from transfuse.models._common import (
    CausalLM,
    GenerationDefaults,
    merge_heads,
    padding_mask,
    split_heads,
)


@dataclass(frozen=True)
class GPT2Config:
    vocab_size: int = 50257  # V
    max_positions: int = 1024  # P
    n_layer: int = 12
    n_head: int = 12  # H
    dim: int = 768  # E
    dropout: float = 0.1
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.dim % self.n_head:
            raise ValueError(f"dim {self.dim} is not divisible by n_head {self.n_head}")


PRESETS: dict[str, GPT2Config] = {
    "tiny": GPT2Config(vocab_size=1000, max_positions=256, n_layer=2, n_head=4, dim=64),
    "small": GPT2Config(),  # GPT-2 124M
}


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        E = config.dim
        self.n_head = config.n_head
        self.q_proj = nn.Linear(E, E)
        self.k_proj = nn.Linear(E, E)
        self.v_proj = nn.Linear(E, E)
        self.o_proj = nn.Linear(E, E)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self, x: torch.Tensor, future: torch.Tensor, padding: torch.Tensor | None = None
    ) -> torch.Tensor:
        q = split_heads(self.q_proj(x), self.n_head)  # (B, H, S, D)
        k = split_heads(self.k_proj(x), self.n_head)  # (B, H, T, D)
        v = split_heads(self.v_proj(x), self.n_head)  # (B, H, T, D)
        scores = torch.matmul(q, k.transpose(-2, -1))  # (B, H, S, T)
        scores = scores * (1.0 / math.sqrt(q.shape[-1]))
        if padding is not None:  # (B, 1, 1, T): padding keys
            scores = scores.masked_fill(padding, torch.finfo(scores.dtype).min)
        scores = scores.masked_fill(future, float("-inf"))
        probs = self.attn_dropout(F.softmax(scores, dim=-1))  # (B, H, S, T)
        out = merge_heads(torch.matmul(probs, v))  # (B, S, E)
        return self.resid_dropout(self.o_proj(out))


class MLP(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.fc = nn.Linear(config.dim, 4 * config.dim)
        self.proj = nn.Linear(4 * config.dim, config.dim)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.fc(x), approximate="tanh")  # (B, S, 4E)
        return self.dropout(self.proj(h))  # (B, S, E)


class Block(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.dim, eps=config.norm_eps)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.dim, eps=config.norm_eps)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, future: torch.Tensor, padding: torch.Tensor | None = None
    ) -> torch.Tensor:
        h = self.ln_1(x)
        # attention's two-argument form stays the plain one (tests patch it in)
        x = x + (self.attn(h, future) if padding is None else self.attn(h, future, padding))
        return x + self.mlp(self.ln_2(x))


class GPT2(CausalLM):
    """forward(input_ids (B, S) int64, position_ids=None, attention_mask=None, use_cache=None)
    -> logits (B, S, V).

    position_ids (B, S): each token's position (default 0..S-1); attention_mask (B, T): 1 for
    real tokens, 0 for padding keys (default: none); use_cache: ignored.
    """

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.dim)
        self.wpe = nn.Embedding(config.max_positions, config.dim)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.dim, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied: one (V, E) tensor
        self.generation_config = GenerationDefaults()

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        use_cache: bool | None = None,
    ) -> torch.Tensor:
        S = input_ids.shape[1]
        if position_ids is None:
            positions = torch.arange(S, device=input_ids.device)  # (S,)
        else:
            positions = position_ids  # (B, S)
        x = self.drop(self.wte(input_ids) + self.wpe(positions))  # (B, S, E)
        # (S, T): True where the key lies in the future of the query and is hidden.
        future = torch.ones(S, S, dtype=torch.bool, device=input_ids.device).triu(1)
        padding = None if attention_mask is None else padding_mask(attention_mask)
        for block in self.h:
            x = block(x, future, padding)
        return self.lm_head(self.ln_f(x))  # (B, S, V)
