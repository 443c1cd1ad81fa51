"""codegen/python/cpu_attention.py: causal attention in query blocks equals SDPA's causal call."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from transfuse.codegen.python import cpu_attention
from transfuse.codegen.python.cpu_attention import BLOCK, MIN_SEQ, causal_attention, causal_mask


@pytest.mark.parametrize("s", [1, BLOCK, MIN_SEQ, MIN_SEQ + 17, 300])
@pytest.mark.parametrize("heads", [(4, 4), (6, 2)])
def test_matches_sdpa_causal(s, heads):
    h, hkv = heads
    gen = torch.Generator().manual_seed(s)
    q = torch.randn(2, h, s, 16, generator=gen)
    k = torch.randn(2, hkv, s, 16, generator=gen)
    v = torch.randn(2, hkv, s, 16, generator=gen)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3,
                                          enable_gqa=hkv != h)
    got = causal_attention(q, k, v, scale=0.3, enable_gqa=hkv != h)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_transposed_views_in_and_a_view_out():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 200, 3, 8, generator=gen).transpose(1, 2) for _ in range(3))
    got = causal_attention(q, k, v)
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v, is_causal=True),
                               rtol=1e-5, atol=1e-6)
    assert got.transpose(1, 2).is_contiguous()  # [B, S, H, D] memory: reshape is free


def test_mask_is_shared_grown_and_capped(monkeypatch):
    monkeypatch.setattr(cpu_attention, "MASK_CACHE", {})
    m = causal_mask(10, torch.float32, torch.device("cpu"))
    assert m.shape[0] >= 10 and m[0, 1] == float("-inf") and m[1, 0] == 0 and m[3, 3] == 0
    assert causal_mask(20, torch.float32, torch.device("cpu")) is m  # reused, not rebuilt
    monkeypatch.setattr(cpu_attention, "MAX_SEQ", 256)
    # past MAX_SEQ: the kernel's own causal path, no mask built
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 300, 8, generator=gen)
    monkeypatch.setattr(cpu_attention, "MASK_CACHE", {})
    torch.testing.assert_close(causal_attention(q, q, q),
                               F.scaled_dot_product_attention(q, q, q, is_causal=True))
    assert cpu_attention.MASK_CACHE == {}


def test_autograd_flows():
    q = torch.randn(1, 2, 150, 8, requires_grad=True)
    causal_attention(q, q.detach(), q.detach()).sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_python_backend_uses_it_for_square_causal_attention():
    import transfuse
    from transfuse.models import get_model

    model, inputs, dyn = get_model("llama-tiny", seq=150)
    compiled = transfuse.optimize(model, inputs, dynamic=dyn, level="O2")
    assert "_causal_attention(" in compiled.source
    with torch.inference_mode():
        torch.testing.assert_close(compiled(*inputs), model(*inputs), rtol=1e-4, atol=1e-5)
