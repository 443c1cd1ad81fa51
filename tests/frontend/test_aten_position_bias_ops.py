"""The aten conversions the position-bias models need (added for issue 10 by the attention
area): ``baddbmm`` (BLOOM's ALiBi scores), binary ``min``/``max`` (T5's position buckets),
SDPA with one K/V head and no ``enable_gqa`` (Falcon), and a slice whose size torch writes
with ``Max`` (MPT's ALiBi table), each checked against eager; the negative cases stay
fallbacks or keep their symbolic form."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from transfuse.frontend.torch_export import capture
from transfuse.ir.interpret import interpret
from transfuse.ir.types import dim_str


def _run(module: torch.nn.Module, *args, dynamic=None):
    captured = capture(module.eval(), args, dynamic=dynamic)
    got = interpret(captured.graph, list(args))
    want = module(*args)
    want = want if isinstance(want, tuple) else (want,)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, equal_nan=True)
    return captured.graph


class Baddbmm(torch.nn.Module):
    def forward(self, x, a, b):
        return (torch.baddbmm(x, a, b, beta=0.5, alpha=2.0), torch.baddbmm(x, a, b),
                torch.baddbmm(x * float("nan"), a, b, beta=0.0))


def test_baddbmm_is_matmul_mul_add_and_ignores_self_at_beta_zero():
    graph = _run(Baddbmm(), torch.randn(3, 1, 5), torch.randn(3, 4, 6), torch.randn(3, 6, 5))
    assert not graph.find("torch_fallback")
    assert len(graph.find("matmul")) == 3


class MinMax(torch.nn.Module):
    def forward(self, x, y):
        return torch.min(x, y), torch.max(x, y), torch.min(x)


def test_binary_min_max_are_minimum_maximum():
    graph = _run(MinMax(), torch.randint(0, 9, (3, 4)), torch.randint(0, 9, (3, 4)))
    assert not graph.find("torch_fallback")
    assert [len(graph.find(op)) for op in ("minimum", "maximum", "reduce_min")] == [1, 1, 1]


class Sdpa(torch.nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def test_sdpa_with_one_kv_head_is_attention_with_kv_heads_1():
    q, k, v = torch.randn(1, 4, 6, 8), torch.randn(1, 1, 6, 8), torch.randn(1, 1, 6, 8)
    (node,) = _run(Sdpa(), q, k, v).find("attention")
    assert node.attrs["kv_heads"] == 1 and node.attrs["causal"]


def test_sdpa_with_one_k_head_but_all_v_heads_stays_a_fallback():
    """K broadcast over the heads but V not: no K/V head layout the op can express."""
    q, k, v = torch.randn(1, 4, 6, 8), torch.randn(1, 1, 6, 8), torch.randn(1, 4, 6, 8)
    graph = _run(Sdpa(), q, k, v)
    assert not graph.find("attention") and graph.find("torch_fallback")


class TableSlice(torch.nn.Module):
    """MPT: a table for 16 positions, its last T columns added to [.., T, T] scores."""

    def __init__(self):
        super().__init__()
        self.register_buffer("table", torch.randn(4, 1, 16))

    def forward(self, scores):
        t = scores.shape[-1]
        return scores + self.table[:, :, max(0, 16 - t):]


def test_slice_size_with_max_resolves_with_the_dim_range():
    scores = torch.randn(1, 4, 6, 6)
    graph = _run(TableSlice(), scores,
                 dynamic={"t": {"range": (2, 15), "dims": {"scores": [2, 3]}}})
    (add,) = graph.find("add")
    assert [dim_str(d) for d in add.outputs[0].shape] == ["1", "4", "t", "t"]
