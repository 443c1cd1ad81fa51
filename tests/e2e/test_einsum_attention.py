"""Attention written with ``torch.einsum`` fuses end to end: the frontend turns the einsums
into matmuls with a permuted K (as ``q @ k.transpose(-2, -1)``) and ``attention.fuse-sdpa``
finds the chain, for [B, H, S, D] and [B, S, H, D] operands, through both targets, with the
causal mask proven and the outputs equal to eager. Returning the probabilities blocks the
fusion, and ``why_not`` says so."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import transfuse

HEADS, HEAD_DIM, HIDDEN = 4, 8, 32


class EinsumAttention(nn.Module):
    """One causal self-attention layer with einsum products; ``layout`` is the operands'."""

    def __init__(self, layout: str, return_probs: bool = False):
        super().__init__()
        self.layout, self.return_probs = layout, return_probs
        self.qkv = nn.Linear(HIDDEN, 3 * HIDDEN)
        self.out = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, HEADS, HEAD_DIM).unbind(2)  # (B, S, H, D)
        masked = torch.ones(s, s, dtype=torch.bool, device=x.device).triu(1)
        if self.layout == "bhsd":
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, S, D)
            scores = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(HEAD_DIM)
        else:
            scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(HEAD_DIM)
        probs = scores.masked_fill(masked, float("-inf")).softmax(-1)  # (B, H, S, T)
        if self.layout == "bhsd":
            o = torch.einsum("bhqk,bhkd->bhqd", probs, v).transpose(1, 2)
        else:
            o = torch.einsum("bhqk,bkhd->bqhd", probs, v)  # (B, S, H, D)
        y = self.out(o.reshape(b, s, HIDDEN))
        return (y, probs) if self.return_probs else y


@pytest.mark.parametrize("target", ["python", "onnxruntime"])
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_einsum_attention_fuses_and_matches_eager(layout, target):
    torch.manual_seed(0)
    model = EinsumAttention(layout).eval()
    compiled = transfuse.optimize(model, (torch.randn(2, 10, HIDDEN),),
                                  dynamic={"seq": (2, 32)}, target=target)
    (node,) = compiled.graph.find("attention")
    assert not compiled.graph.find("softmax") and not compiled.graph.find("torch_fallback")
    assert node.attrs["causal"] and node.attrs["scale"] == pytest.approx(HEAD_DIM ** -0.5)
    assert len(node.inputs) == 3  # the mask is the causal attr, no bias
    with torch.inference_mode():
        for seq in (10, 5):
            x = torch.randn(2, seq, HIDDEN)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)


def test_einsum_attention_returning_probabilities_is_not_fused():
    torch.manual_seed(0)
    model = EinsumAttention("bhsd", return_probs=True).eval()
    compiled = transfuse.optimize(model, (torch.randn(2, 10, HIDDEN),))
    assert not compiled.graph.find("attention")
    assert "is a graph output" in compiled.pass_log.why_not("attention/sdpa")
