"""Calibration: the inputs of the layers to quantize, observed through the reference
interpreter, summed exactly; bad batches are typed errors."""

import pytest
import torch

from transfuse.errors import InputError
from transfuse.ir.parser import parse_graph
from transfuse.passes.quant.calibrate import calibrate, check_batches, progress_bar

GRAPH = """
graph main(%x: f32[batch, seq, 8]) {
  const %nw: f32[8]
  const %w1: f32[6, 8]
  const %w2: f32[8, 6]
  %h: f32[batch, seq, 8] = rms_norm(%x, %nw)  # @norm
  %u: f32[batch, seq, 6] = linear(%h, %w1, _)  # @up
  %d: f32[batch, seq, 8] = linear(%u, %w2, _)  # @down
  return %d
}"""


def _graph():
    g = parse_graph(GRAPH)
    values = {v.name: v for v in g.values()}
    return g, values


def _batches(n=3, rows=4):
    gen = torch.Generator().manual_seed(0)
    return [[torch.randn(1, rows, 8, generator=gen)] for _ in range(n)]


def test_statistics_are_exact_over_all_batches():
    g, v = _graph()
    batches = _batches()
    stats = calibrate(g, batches, [v["h"], v["u"], v["x"]], hessian_for=[v["h"], v["x"]],
                      progress=False)
    nw = v["nw"].const
    hs = []
    for (x,) in batches:
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * nw
        hs.append(h.reshape(-1, 8))
    h_all = torch.cat(hs)
    st = stats[id(v["h"])]
    assert st.rows == 12 and st.k == 8
    torch.testing.assert_close(st.hessian, h_all.double().T @ h_all.double(), rtol=1e-6,
                               atol=1e-6)
    assert st.hessian.dtype == torch.float64
    torch.testing.assert_close(st.abs_mean, h_all.abs().mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(st.abs_max, h_all.abs().amax(0))
    assert st.sample.shape == (12, 8)  # under the cap: every row, in order
    torch.testing.assert_close(st.sample, h_all, rtol=1e-5, atol=1e-6)
    # no Hessian where none was asked; a graph input is observed too
    assert stats[id(v["u"])].hessian is None and stats[id(v["u"])].k == 6
    x_all = torch.cat([b[0].reshape(-1, 8) for b in batches])
    torch.testing.assert_close(stats[id(v["x"])].abs_max, x_all.abs().amax(0))


def test_sample_is_capped_uniform_and_seeded():
    g, v = _graph()
    batches = _batches(n=4, rows=16)
    a = calibrate(g, batches, [v["x"]], sample_rows=10, progress=False)[id(v["x"])]
    b = calibrate(g, batches, [v["x"]], sample_rows=10, progress=False)[id(v["x"])]
    c = calibrate(g, batches, [v["x"]], sample_rows=10, progress=False, seed=1)[id(v["x"])]
    assert a.rows == 64 and a.sample.shape == (10, 8)
    assert torch.equal(a.sample, b.sample) and not torch.equal(a.sample, c.sample)
    x_all = torch.cat([bt[0].reshape(-1, 8) for bt in batches])
    # every sampled row is a real row, none twice
    idx = [int((x_all == r).all(1).nonzero()[0]) for r in a.sample]
    assert len(set(idx)) == 10


@pytest.mark.parametrize("batches, message", [
    ([[torch.randn(1, 4, 8)], [torch.randn(1, 4, 8, dtype=torch.float64)]],
     "calibration batch 1: input x must be f32[batch, seq, 8], got f64[1, 4, 8]"),
    ([[torch.randn(1, 4, 8)], [torch.randn(4, 8)]],
     "calibration batch 1: input x: expected rank 3"),
    ([[torch.randn(1, 4, 7)]], "calibration batch 0: input x: dim 2 must be 8"),
    ([[torch.randn(1, 4, 8), torch.randn(1)]], "calibration batch 0: graph main takes 1 inputs"),
    (torch.randn(1, 4, 8), "calibration: expected a list of batches"),
    ([["ids"]], "calibration batch 0: input x: expected a tensor"),
])
def test_bad_batches(batches, message):
    g, v = _graph()
    with pytest.raises(InputError) as e:
        calibrate(g, batches, [v["h"]], progress=False)
    assert message in str(e.value)


def test_single_tensor_batches_and_no_bar_off_a_terminal():
    g, _ = _graph()
    x = torch.randn(1, 2, 8)
    assert check_batches(g, [x])[0][0] is x
    items = [1, 2]
    assert progress_bar(items, "x", False, "batch") is items
    assert progress_bar(items, "x", True, "batch") is items  # pytest's stderr is no tty
