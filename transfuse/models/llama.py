"""Llama: a decoder-only Transformer with RoPE, RMSNorm, SwiGLU and grouped-query attention.

Pre-norm blocks, no biases, an untied LM head. Rotary embeddings use the
rotate-half form with cos/sin tables kept in non-persistent buffers. Keys and
values have Hkv <= H heads and are repeated to H heads by `repeat_kv` (expand +
reshape, as Hugging Face writes it). The causal mask is built in forward as an
additive (S, T) tensor of 0 and finfo.min. The layout follows gpt-fast and
Hugging Face's modeling_llama.

Generation (``transfuse.optimize(model, (ids,), generation=...)``) captures the model
with ``position_ids`` (B, S), whose rows of the RoPE tables replace rows 0..S-1, and
``use_cache`` (accepted and ignored: the compiler puts the KV cache in the graph). An
optional ``attention_mask`` (B, T) hides padding keys. Without them the computation is
exactly the plain one. ``get_output_embeddings()`` is the LM head and
``generation_config`` the defaults of ``generate()`` (no EOS token).

Glossary: B batch, S query length, T key length (T == S here), H heads, Hkv kv
heads, D head dim, E embed dim (H * D), F MLP hidden dim, V vocab size, P max
positions.
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
class LlamaConfig:
    vocab_size: int = 32000  # V
    max_positions: int = 2048  # P
    n_layer: int = 12
    n_head: int = 12  # H
    n_kv_head: int = 4  # Hkv
    dim: int = 768  # E
    ffn_dim: int = 2048  # F
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    dropout: float = 0.0  # attention dropout, as in Hugging Face's config

    def __post_init__(self) -> None:
        if self.dim % self.n_head:
            raise ValueError(f"dim {self.dim} is not divisible by n_head {self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head {self.n_head} is not divisible by n_kv_head {self.n_kv_head}")


PRESETS: dict[str, LlamaConfig] = {
    "tiny": LlamaConfig(
        vocab_size=1000, max_positions=256, n_layer=2, n_head=4, n_kv_head=2, dim=64, ffn_dim=176
    ),
    "small": LlamaConfig(),  # ~125M parameters
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_tables(head_dim: int, max_positions: int, theta: float) -> tuple[torch.Tensor, ...]:
    """cos and sin of position * frequency, each (P, D), halves repeated for rotate-half."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)  # (P, D/2)
    angles = torch.cat((angles, angles), dim=-1)  # (P, D)
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, S, D) rotated by cos/sin (S, D) or (B, 1, S, D)."""
    return x * cos + rotate_half(x) * sin


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, Hkv, T, D) -> (B, Hkv * n_rep, T, D); each kv head serves n_rep query heads."""
    if n_rep == 1:
        return x
    B, Hkv, T, D = x.shape
    x = x[:, :, None, :, :].expand(B, Hkv, n_rep, T, D)
    return x.reshape(B, Hkv * n_rep, T, D)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        D = config.dim // config.n_head
        self.q_proj = nn.Linear(config.dim, config.n_head * D, bias=False)
        self.k_proj = nn.Linear(config.dim, config.n_kv_head * D, bias=False)
        self.v_proj = nn.Linear(config.dim, config.n_kv_head * D, bias=False)
        self.o_proj = nn.Linear(config.n_head * D, config.dim, bias=False)
        self.attn_dropout = nn.Dropout(config.dropout)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        q = apply_rope(split_heads(self.q_proj(x), self.n_head), cos, sin)  # (B, H, S, D)
        k = apply_rope(split_heads(self.k_proj(x), self.n_kv_head), cos, sin)  # (B, Hkv, T, D)
        v = split_heads(self.v_proj(x), self.n_kv_head)  # (B, Hkv, T, D)
        n_rep = self.n_head // self.n_kv_head
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)  # (B, H, T, D)
        scores = torch.matmul(q, k.transpose(-2, -1))  # (B, H, S, T)
        scores = scores * (1.0 / math.sqrt(q.shape[-1])) + mask
        probs = self.attn_dropout(F.softmax(scores, dim=-1))  # (B, H, S, T)
        return self.o_proj(merge_heads(torch.matmul(probs, v)))  # (B, S, E)


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.up_proj = nn.Linear(config.dim, config.ffn_dim, bias=False)
        self.down_proj = nn.Linear(config.ffn_dim, config.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # (B, S, F) -> E


class Block(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.input_norm = RMSNorm(config.dim, config.norm_eps)
        self.attn = Attention(config)
        self.post_attn_norm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        x = x + self.attn(self.input_norm(x), cos, sin, mask)
        return x + self.mlp(self.post_attn_norm(x))


class Llama(CausalLM):
    """forward(input_ids (B, S) int64, position_ids=None, attention_mask=None, use_cache=None)
    -> logits (B, S, V).

    position_ids (B, S): each token's position (default 0..S-1); attention_mask (B, T): 1 for
    real tokens, 0 for padding keys (default: none); use_cache: ignored.
    """

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        cos, sin = rope_tables(config.dim // config.n_head, config.max_positions, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)  # (P, D)
        self.register_buffer("rope_sin", sin, persistent=False)  # (P, D)
        self.generation_config = GenerationDefaults()

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        use_cache: bool | None = None,
    ) -> torch.Tensor:
        S = input_ids.shape[1]
        x = self.embed(input_ids)  # (B, S, E)
        if position_ids is None:
            cos, sin = self.rope_cos[:S], self.rope_sin[:S]  # (S, D)
        else:  # each row's own positions
            cos = self.rope_cos[position_ids].unsqueeze(1)  # (B, 1, S, D)
            sin = self.rope_sin[position_ids].unsqueeze(1)  # (B, 1, S, D)
        mask = torch.full((S, S), torch.finfo(x.dtype).min, dtype=x.dtype, device=x.device)
        mask = mask.triu(1)  # (S, T): 0 on and below the diagonal, finfo.min above
        if attention_mask is not None:  # (B, 1, S, T): padding keys hidden too
            mask = mask.masked_fill(padding_mask(attention_mask), torch.finfo(x.dtype).min)
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return self.lm_head(self.norm(x))  # (B, S, V)
