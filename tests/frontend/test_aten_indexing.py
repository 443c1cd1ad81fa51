"""torch.export capture of advanced indexing: ``x[.., i, .., j]`` (``aten::index.Tensor``)
becomes the IR ``index`` op and ``x[i, j] = v`` / ``+= v`` (``aten::index_put``) becomes
``scatter_nd``, so both targets run them; index lists the IR does not express (a bool mask,
None before an index of ``index_put``) stay a counted ``torch_fallback``. Each case runs on
both targets against eager at two sequence lengths.

Glossary: S sequence length (dynamic), I index shape.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import transfuse


class Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x, i, j):
        return self.fn(x, i, j)


# x [S, 4, 6]; i indexes dim 0 (distinct rows, one negative), j dim 1 or 2 (in [-4, 4))


def _index_apart(x, i, j):
    return x[i, :, j] * 2  # dims 0 and 2: I first


def _index_mixed(x, i, j):
    return torch.ops.aten.index.Tensor(x, [i[0], None, j])  # x[i0, :, j], i0 0-d: I first


def _index_in_place(x, i, j):
    return x[:, j, -1 - j]  # dims 1 and 2: I in place


def _put(x, i, j):
    y = x.clone()
    y[i, j] = torch.ones_like(y[i, j]) * 3  # values of shape I + x.shape[2:]
    return y


def _put_accumulate(x, i, j):
    return x.index_put((i.remainder(2),), torch.ones(3, 4, 6), accumulate=True)  # repeats


def _put_broadcast(x, i, j):
    return x.index_put((i, j), torch.tensor(5.0))  # a 0-d value broadcast to every slice


CASES = {  # name -> (fn, IR op it becomes)
    "index-apart": (_index_apart, "index"),
    "index-mixed-0d": (_index_mixed, "index"),
    "index-in-place": (_index_in_place, "index"),
    "index_put": (_put, "scatter_nd"),
    "index_put-accumulate": (_put_accumulate, "scatter_nd"),
    "index_put-0d-value": (_put_broadcast, "scatter_nd"),
}


def _inputs(seq: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(seq, 4, 6, generator=g)
    i = torch.tensor([0, -1, 1])  # distinct rows for seq >= 3 (put without accumulate)
    j = torch.randint(-4, 4, (3,), generator=g)  # negative indices count from the end
    return x, i, j


@pytest.mark.parametrize("target", ["python", "onnxruntime"])
@pytest.mark.parametrize("name", list(CASES))
def test_indexing_becomes_ir_ops_on_both_targets(name, target):
    fn, op = CASES[name]
    model = Fn(fn).eval()
    compiled = transfuse.optimize(model, _inputs(5, 0), target=target,
                                  dynamic={"seq": {"range": (3, 16), "dims": {"x": 0}}})
    graph = compiled.graph
    assert graph.find(op) and not graph.find("torch_fallback"), graph
    for seq in (5, 9):
        args = _inputs(seq, seq)
        torch.testing.assert_close(compiled(*args), fn(*args), rtol=1e-6, atol=1e-6)


def _put_after_none(x, i, j):
    return torch.ops.aten.index_put(x, [None, j], torch.tensor(1.0))  # x[:, j] = 1


def _bool_mask_index(x, i, j):
    y = x.clone()
    y[x > 0] = 0.0
    return y


@pytest.mark.parametrize("fn", [_put_after_none, _bool_mask_index], ids=["none-first", "bool"])
def test_index_lists_the_ir_does_not_express_stay_fallbacks(fn):
    model = Fn(fn).eval()
    compiled = transfuse.optimize(model, _inputs(5, 0),
                                  dynamic={"seq": {"range": (3, 16), "dims": {"x": 0}}})
    assert compiled.graph.meta["fallbacks"] == {"aten::index_put.default": 1}
    args = _inputs(7, 1)
    torch.testing.assert_close(compiled(*args), fn(*args))
