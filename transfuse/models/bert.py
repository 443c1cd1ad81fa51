"""BERT: a bidirectional Transformer encoder with a key-padding mask.

Word + position + token-type embeddings, post-norm blocks (sublayer -> dropout ->
residual add -> LayerNorm), GELU in its exact erf form, and attention written out
as plain math: scores divided by sqrt(D) plus the extended padding mask
`(1 - attention_mask) * finfo.min`. Dropout is 0.1 as in the original config, so
eval-mode dropout is part of the captured graph. No pooler: forward returns the
last hidden state. The layout follows Hugging Face's modeling_bert.

Glossary: B batch, S query length, T key length (T == S here), H heads, D head
dim, E embed dim (H * D), F MLP hidden dim, V vocab size, P max positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from transfuse.models._common import merge_heads, split_heads


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522  # V
    max_positions: int = 512  # P
    type_vocab_size: int = 2
    n_layer: int = 12
    n_head: int = 12  # H
    dim: int = 768  # E
    ffn_dim: int = 3072  # F
    dropout: float = 0.1
    norm_eps: float = 1e-12

    def __post_init__(self) -> None:
        if self.dim % self.n_head:
            raise ValueError(f"dim {self.dim} is not divisible by n_head {self.n_head}")


PRESETS: dict[str, BertConfig] = {
    "tiny": BertConfig(
        vocab_size=1000, max_positions=256, n_layer=2, n_head=4, dim=64, ffn_dim=256
    ),
    "small": BertConfig(),  # BERT-base, 110M
    "base": BertConfig(),
}


class SelfAttention(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        E = config.dim
        self.n_head = config.n_head
        self.query = nn.Linear(E, E)
        self.key = nn.Linear(E, E)
        self.value = nn.Linear(E, E)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.out = nn.Linear(E, E)
        self.out_dropout = nn.Dropout(config.dropout)
        self.norm = nn.LayerNorm(E, eps=config.norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        q = split_heads(self.query(x), self.n_head)  # (B, H, S, D)
        k = split_heads(self.key(x), self.n_head)  # (B, H, T, D)
        v = split_heads(self.value(x), self.n_head)  # (B, H, T, D)
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, S, T)
        if mask is not None:
            scores = scores + mask  # (B, 1, 1, T) broadcast over heads and queries
        probs = self.attn_dropout(F.softmax(scores, dim=-1))  # (B, H, S, T)
        out = merge_heads(torch.matmul(probs, v))  # (B, S, E)
        return self.norm(x + self.out_dropout(self.out(out)))


class MLP(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.dim, config.ffn_dim)
        self.proj = nn.Linear(config.ffn_dim, config.dim)
        self.dropout = nn.Dropout(config.dropout)
        self.norm = nn.LayerNorm(config.dim, eps=config.norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.fc(x))  # (B, S, F)
        return self.norm(x + self.dropout(self.proj(h)))  # (B, S, E)


class Block(nn.Module):
    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.attn = SelfAttention(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.mlp(self.attn(x, mask))


class Bert(nn.Module):
    """forward(input_ids (B, S), attention_mask (B, S) of 1/0, token_type_ids (B, S))
    -> last hidden state (B, S, E)."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.word_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.position_embeddings = nn.Embedding(config.max_positions, config.dim)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.dim)
        self.embed_norm = nn.LayerNorm(config.dim, eps=config.norm_eps)
        self.embed_dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        S = input_ids.shape[1]
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        positions = torch.arange(S, device=input_ids.device)  # (S,)
        x = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(positions)
            + self.token_type_embeddings(token_type_ids)
        )  # (B, S, E)
        x = self.embed_dropout(self.embed_norm(x))
        mask = None
        if attention_mask is not None:
            keep = attention_mask[:, None, None, :].to(x.dtype)  # (B, 1, 1, T)
            mask = (1.0 - keep) * torch.finfo(x.dtype).min
        for layer in self.layers:
            x = layer(x, mask)
        return x  # (B, S, E)
