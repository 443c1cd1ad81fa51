"""recognize.fuse-norms on the spellings users write besides ``torch.rsqrt(x.pow(2).mean())``:
``torch.square`` (``mul(x, x)`` / ``pow(x, 2)``), ``x.var(unbiased=False)`` (decomposed by the
frontend into mean / sub / square / mean) and ``1 / torch.sqrt(v + eps)`` (``reciprocal(sqrt)``
after cleanup, ``div(1, sqrt)`` from ONNX). Each fuses with the right eps and matches eager;
each near miss says why."""

from __future__ import annotations

import pytest
import torch
from pass_helpers import assert_graph
from recognize_helpers import fuse, misses

from transfuse.frontend.torch_export import capture
from transfuse.ir.interpret import interpret
from transfuse.passes.manager import run_pipeline
from transfuse.passes.recognize import RECOGNIZE

PASS = "recognize.fuse-norms"
EPS32 = float(torch.tensor(1e-5))  # the graph's fp32 epsilon, exactly

RMS_ONE_DIV_SQRT = """
graph main(%x: f32[batch, seq, 8]) {
  const %eps: f32[] = 1e-05
  const %one: f32[] = 1.0
  %0: f32[batch, seq, 8] = mul(%x, %x)
  %1: f32[batch, seq, 1] = reduce_mean(%0) {axes=[-1], keepdim}
  %2: f32[batch, seq, 1] = add(%1, %eps)
  %3: f32[batch, seq, 1] = sqrt(%2)
  %4: f32[batch, seq, 1] = div(%one, %3)
  %5: f32[batch, seq, 8] = mul(%x, %4)
  return %5
}"""


def test_rms_norm_times_one_over_sqrt_and_times_reciprocal_sqrt():
    for text in (RMS_ONE_DIV_SQRT,
                 RMS_ONE_DIV_SQRT.replace("div(%one, %3)", "reciprocal(%3)")):
        graph, rec = fuse(text, PASS, rtol=1e-5, atol=1e-6)
        assert_graph(graph, """
graph main(%x: f32[batch, seq, 8]) {
  %0: f32[batch, seq, 8] = rms_norm(%x, _) {eps=9.999999747378752e-06, upcast=false}
  return %0
}""")
        assert rec.matched("norm/rms-norm") == 1
        assert graph.find("rms_norm")[0].attrs["eps"] == EPS32


def test_two_over_sqrt_is_a_near_miss():
    text = RMS_ONE_DIV_SQRT.replace("const %one: f32[] = 1.0", "const %one: f32[] = 2.0")
    graph, rec = fuse(text, PASS)
    assert_graph(graph, text)
    assert any("2.0 is not the 1 of 1 / sqrt(...)" in miss for miss in misses(rec, "norm/rms-norm"))


LAYER_NORM_VAR = """
graph main(%x: f32[batch, seq, 8]) {
  const %w: f32[8]
  const %eps: f32[] = 1e-05
  const %one: f32[] = 1.0
  %0: f32[batch, seq, 1] = reduce_mean(%x) {axes=[-1], keepdim}
  %1: f32[batch, seq, 1] = reduce_mean(%x) {axes=[-1], keepdim}
  %2: f32[batch, seq, 8] = sub(%x, %1)
  %3: f32[batch, seq, 8] = mul(%2, %2)
  %4: f32[batch, seq, 1] = reduce_mean(%3) {axes=[-1], keepdim}
  %5: f32[batch, seq, 1] = add(%4, %eps)
  %6: f32[batch, seq, 1] = sqrt(%5)
  %7: f32[batch, seq, 1] = div(%one, %6)
  %8: f32[batch, seq, 8] = sub(%x, %0)
  %9: f32[batch, seq, 8] = mul(%8, %7)
  %10: f32[batch, seq, 8] = mul(%9, %w)
  return %10
}"""

LAYER_NORM_FUSED = """
graph main(%x: f32[batch, seq, 8]) {
  const %w: f32[8]
  %0: f32[batch, seq, 8] = layer_norm(%x, %w, _) {eps=9.999999747378752e-06}
  return %0
}"""


def test_layer_norm_with_its_own_variance_centring_and_one_over_sqrt():
    # x.var() decomposed: its x - mean(x) is a second node (no CSE ran)
    graph, rec = fuse(LAYER_NORM_VAR, PASS, rtol=1e-5, atol=1e-5)
    assert_graph(graph, LAYER_NORM_FUSED)
    assert rec.matched("norm/layer-norm") == 1
    assert graph.find("layer_norm")[0].attrs["eps"] == EPS32
    # after CSE the two centrings are one node; reciprocal instead of 1 / ...
    merged = LAYER_NORM_VAR.replace("sub(%x, %1)", "sub(%x, %0)").replace(
        "  %1: f32[batch, seq, 1] = reduce_mean(%x) {axes=[-1], keepdim}\n", "").replace(
        "  %8: f32[batch, seq, 8] = sub(%x, %0)\n", "").replace("mul(%8, %7)", "mul(%2, %7)")
    graph, rec = fuse(merged.replace("div(%one, %6)", "reciprocal(%6)"), PASS,
                      rtol=1e-5, atol=1e-5)
    assert_graph(graph, LAYER_NORM_FUSED)


def test_unbiased_variance_is_a_near_miss():
    # the frontend's x.var() (correction 1): sum(d * d) / (N - 1)
    text = LAYER_NORM_VAR.replace("  const %one: f32[] = 1.0\n", """  const %one: f32[] = 1.0
  const %count: f32[] = 7.0
""").replace("  %4: f32[batch, seq, 1] = reduce_mean(%3) {axes=[-1], keepdim}", """  %11: f32[batch, seq, 1] = reduce_sum(%3) {axes=[-1], keepdim}
  %4: f32[batch, seq, 1] = div(%11, %count)""")
    graph, rec = fuse(text, PASS)
    assert not graph.find("layer_norm")
    (miss,) = misses(rec, "norm/layer-norm")
    assert miss == ("the variance divides the sum of squares by 7, not by N = 8 (an unbiased "
                    "variance, correction 1); layer_norm divides by N")
    # sum(d * d) / N is the biased variance
    graph, rec = fuse(text.replace("= 7.0", "= 8.0"), PASS, rtol=1e-5, atol=1e-5)
    assert_graph(graph, LAYER_NORM_FUSED)


def test_variance_of_another_tensor_is_a_near_miss():
    text = LAYER_NORM_VAR.replace("(%x: f32[batch, seq, 8])", "(%x: f32[batch, seq, 8], "
                                  "%y: f32[batch, seq, 8])").replace("sub(%x, %1)", "sub(%y, %1)")
    graph, rec = fuse(text, PASS)
    assert not graph.find("layer_norm")
    (miss,) = misses(rec, "norm/layer-norm")
    assert "'x' must be the same value twice" in miss


# -- captured modules, against eager ---------------------------------------------------------


class _RMSNorm(torch.nn.Module):
    def __init__(self, square, inverse, eps=1e-2):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.rand(16) + 0.5)
        self.square, self.inverse, self.eps = square, inverse, eps

    def forward(self, x):
        return self.weight * (x * self.inverse(self.square(x).mean(-1, keepdim=True) + self.eps))


class _LayerNorm(torch.nn.Module):
    def __init__(self, variance, inverse, eps=1e-2):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.rand(16) + 0.5)
        self.bias = torch.nn.Parameter(torch.randn(16))
        self.variance, self.inverse, self.eps = variance, inverse, eps

    def forward(self, x):
        mean = x.mean(-1, keepdim=True)
        return (x - mean) * self.inverse(self.variance(x) + self.eps) * self.weight + self.bias


SQUARES = {
    "torch.square": torch.square,
    "x * x": lambda x: x * x,
    "x.pow(2)": lambda x: x.pow(2),
}
INVERSES = {
    "rsqrt": torch.rsqrt,
    "1 / sqrt": lambda v: 1 / torch.sqrt(v),
    "reciprocal(sqrt)": lambda v: torch.reciprocal(torch.sqrt(v)),
}
def _explicit_var(x):
    """x.var(unbiased=False) written out: mean(x), d = x - mean, mean(d * d)."""
    d = x - x.mean(-1, keepdim=True)
    return (d * d).mean(-1, keepdim=True)


VARIANCES = {
    "var(unbiased=False)": lambda x: x.var(dim=-1, keepdim=True, unbiased=False),
    "var(correction=0)": lambda x: torch.var(x, -1, keepdim=True, correction=0),
    "mean(square(x - mean))": lambda x: torch.square(x - x.mean(-1, keepdim=True)).mean(
        -1, keepdim=True),
    "mean(d * d)": _explicit_var,
    "mean(d.pow(2))": lambda x: (x - x.mean(-1, keepdim=True)).pow(2).mean(-1, keepdim=True),
}


def _recognised(model):
    """Capture, clean up and recognise; the graph's ops after checking it against eager on
    low-variance inputs (where an eps of 1e-2 against a dropped or default one shows)."""
    x = 0.05 * torch.randn(2, 5, 16)
    graph = capture(model.eval(), (x,)).graph
    run_pipeline(graph, "O1")
    log = run_pipeline(graph, RECOGNIZE, verify=True, sample_inputs=[x])
    with torch.no_grad():
        want = model(x)
    torch.testing.assert_close(interpret(graph, [x])[0], want, rtol=1e-5, atol=1e-5)
    return [n.op for n in graph.nodes], graph, log


def _one_norm(model, op: str):
    """The graph is one ``op`` with the module's eps, weight (and bias)."""
    ops, graph, _ = _recognised(model)
    assert ops == [op], ops
    (norm,) = graph.find(op)
    assert norm.attrs["eps"] == pytest.approx(model.eps, rel=1e-6)
    assert all(v is not None for v in norm.inputs), norm
    return norm


@pytest.mark.parametrize("inverse", INVERSES)
@pytest.mark.parametrize("square", SQUARES)
def test_rms_norm_spellings_fuse_and_match_eager(square, inverse):
    _one_norm(_RMSNorm(SQUARES[square], INVERSES[inverse]), "rms_norm")


@pytest.mark.parametrize("inverse", INVERSES)
@pytest.mark.parametrize("variance", VARIANCES)
def test_layer_norm_spellings_fuse_and_match_eager(variance, inverse):
    _one_norm(_LayerNorm(VARIANCES[variance], INVERSES[inverse]), "layer_norm")


def test_layer_norm_with_the_unbiased_variance_stays_unfused_and_matches_eager():
    for unbiased in (lambda x: _explicit_var(x) * (16 / 15),
                     lambda x: torch.var(x, -1, keepdim=True, correction=1),
                     lambda x: x.var(dim=-1, keepdim=True)):
        ops, _, log = _recognised(_LayerNorm(unbiased, torch.rsqrt))
        assert "layer_norm" not in ops and "torch_fallback" not in ops, ops
    # the frontend's x.var() divides by N - 1: the near miss says so
    assert "by 15, not by N = 16 (an unbiased variance" in log.why_not("norm/layer-norm")
