"""layout.select-gemm: the CPU GEMM library of each linear is chosen by asking the target
(timings), recorded as the linear's ``gemm`` attribute, kept through print/parse and
save/load. Unit tests ask a fake target with fixed answers; the last ones ask the real
python target."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from pass_helpers import apply

import transfuse
from transfuse.codegen.python.blas import blas_unavailable
from transfuse.codegen.targets import get_target
from transfuse.errors import IRVerifyError, PassError
from transfuse.ir.parser import parse_graph
from transfuse.ir.printer import print_graph
from transfuse.ir.verify import verify
from transfuse.models import get_model

needs_blas = pytest.mark.skipif(blas_unavailable() is not None,
                                reason=f"numpy's OpenBLAS is unavailable: {blas_unavailable()}")

GRAPH = """
graph main(%x: f32[batch, seq, 64]) {
  const %w1: f32[256, 64]
  const %b1: f32[256]
  const %w2: f32[64, 256]
  %0: f32[batch, seq, 256] = linear(%x, %w1, %b1) {activation="gelu"}
  %1: f32[batch, seq, 64] = linear(%0, %w2, _)
  return %1
}"""


@dataclasses.dataclass(frozen=True)
class Timing:
    torch_s: float
    blas_s: float
    flops: float

    def gflops(self, which: str) -> float:
        return self.flops / (self.torch_s if which == "torch" else self.blas_s) / 1e9


class FakeTarget:
    """Answers select-gemm's questions from fixed data: (K, N) -> (torch s, blas s)."""

    name = "python"
    gemm_libraries = ("torch", "blas")

    def __init__(self, seconds=None, unavailable=None, no_native=None):
        self.seconds = seconds or {}
        self.unavailable, self.no_native = unavailable, no_native
        self.timed: list[tuple] = []

    def gemm_unavailable(self):
        return self.unavailable

    def native_kernels_unavailable(self):
        return self.no_native

    def gemm_relayout_eligible(self, weight):
        return bool(weight.uses) and all(u.op == "linear" and i == 1 for u, i in weight.uses)

    def gemm_weight_relaid(self, weight):
        return self.gemm_relayout_eligible(weight) and all(
            u.attrs.get("gemm") == "blas" for u, _ in weight.uses)

    def time_gemm(self, rows, weights, bias, *, relayout, use_cache=True):
        n, k = weights[0].shape
        self.timed.append((rows, k, n, len(weights), bias is not None, relayout, use_cache))
        torch_s, blas_s = self.seconds[(k, n)]
        return Timing(torch_s, blas_s, 2.0 * rows * k * n), " (fake)"


def _gemms(graph):
    return [n.attrs["gemm"] for n in graph.find("linear")]


def _opts(target, **more):
    return {"sample_inputs": [torch.randn(4, 64, 64)], "select_gemm_min_columns": 1,
            "target": target, **more}


def test_forced_blas_marks_every_linear_and_keeps_the_math():
    target = FakeTarget()
    graph, rec = apply(GRAPH, "layout.select-gemm", options={"gemm": "blas", "target": target})
    assert _gemms(graph) == ["blas", "blas"]
    assert rec.matched("layout/select-gemm") == 2
    assert target.timed == []  # forced: nothing timed
    text = print_graph(graph)
    assert 'gemm="blas"' in text
    again = parse_graph(text)  # the choice survives the text form
    assert _gemms(again) == ["blas", "blas"]
    assert any("stores 2 weight(s) K-major" in n for n in rec.notes), rec.notes


def test_forced_torch_changes_nothing():
    graph, rec = apply(GRAPH, "layout.select-gemm",
                       options={"gemm": "torch", "target": FakeTarget()})
    assert _gemms(graph) == ["torch", "torch"] and rec.status == "unchanged"


def test_auto_chooses_what_the_target_timed_faster_beyond_the_margin():
    # w1 [256, 64]: OpenBLAS 10% faster -> blas; w2 [64, 256]: 2% faster, inside the 3% margin
    target = FakeTarget({(64, 256): (1.0e-4, 0.9e-4), (256, 64): (1.0e-4, 0.98e-4)})
    graph, rec = apply(GRAPH, "layout.select-gemm", options=_opts(target))
    assert _gemms(graph) == ["blas", "torch"]
    assert rec.matched("layout/select-gemm") == 1
    # one timing per distinct shape, at M = 4 * 64 rows capped to 64, K-major, with the cache
    assert sorted(target.timed) == [(64, 64, 256, 1, True, True, True),
                                    (64, 256, 64, 1, False, True, True)]
    lines = [n for n in rec.notes if "GFLOP/s" in n]
    assert len(lines) == 2, rec.notes
    assert ("layout/select-gemm: M=256 K=64 N=256 +bias (timed at M=64, 1 weight(s)): torch "
            "21.0 GFLOP/s, OpenBLAS K-major 23.3 GFLOP/s -> blas (fake)") in lines
    assert any(n.endswith("-> torch (fake)") for n in lines)
    # a wider margin keeps both on torch; select_gemm_cache=False reaches the target
    graph, rec = apply(GRAPH, "layout.select-gemm",
                       options=_opts(target, select_gemm_margin=0.2, select_gemm_cache=False))
    assert _gemms(graph) == ["torch", "torch"] and target.timed[-1][-1] is False


def test_several_threads_without_native_kernels_stay_on_torch(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    target = FakeTarget({(64, 256): (1.0, 0.5), (256, 64): (1.0, 0.5)},
                        no_native="no C compiler found")
    graph, rec = apply(GRAPH, "layout.select-gemm", options=_opts(target))
    assert _gemms(graph) == ["torch", "torch"] and target.timed == []
    assert any("2 threads without the native kernels" in n and "no C compiler" in n
               for n in rec.notes), rec.notes
    # forced blas is the user's call and still honoured
    graph, _ = apply(GRAPH, "layout.select-gemm", options=_opts(target, gemm="blas"))
    assert _gemms(graph) == ["blas", "blas"]
    # one thread: the native kernels do not matter, the timings decide
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    graph, _ = apply(GRAPH, "layout.select-gemm", options=_opts(target))
    assert _gemms(graph) == ["blas", "blas"]


def test_unavailable_blas_keeps_torch():
    target = FakeTarget(unavailable="numpy's BLAS is not OpenBLAS")
    graph, rec = apply(GRAPH, "layout.select-gemm", options=_opts(target, gemm="blas"))
    assert _gemms(graph) == ["torch", "torch"]
    assert any("OpenBLAS path unavailable: numpy's BLAS is not OpenBLAS" in n for n in rec.notes)


def test_min_columns_limits_what_is_timed():
    target = FakeTarget()
    graph, rec = apply(GRAPH, "layout.select-gemm",
                       options=_opts(target, select_gemm_min_columns=8192))
    assert _gemms(graph) == ["torch", "torch"] and target.timed == []
    assert sum("not timed (N < 8192)" in n for n in rec.notes) == 2


def test_tied_weight_is_timed_without_relayout():
    target = FakeTarget({(64, 512): (1.0e-4, 0.5e-4)})
    graph, rec = apply("""
graph main(%ids: i64[batch, seq]) {
  const %wte: f32[512, 64]
  %0: f32[batch, seq, 64] = embedding(%wte, %ids)
  %1: f32[batch, seq, 512] = linear(%0, %wte, _)
  return %1
}""", "layout.select-gemm", options={"sample_inputs": [torch.randint(0, 512, (2, 64))],
                                     "target": target})
    (line,) = [n for n in rec.notes if "GFLOP/s" in n]
    assert "[N, K] transposed" in line and "1 weight(s)" in line
    assert target.timed[0][5] is False  # relayout
    assert _gemms(graph) == ["blas"]
    assert not any("K-major (" in n for n in rec.notes)  # the tied weight is not copied


def test_tiny_gemms_are_not_timed():
    target = FakeTarget()
    graph, rec = apply(GRAPH, "layout.select-gemm",
                       options=_opts(target, sample_inputs=[torch.randn(1, 2, 64)]))
    assert _gemms(graph) == ["torch", "torch"] and target.timed == []
    assert any("too small to time" in n for n in rec.notes)


def test_other_targets_and_no_target_are_left_alone():
    onnx_like = FakeTarget()
    onnx_like.name, onnx_like.gemm_libraries = "onnxruntime", ("torch",)
    graph, rec = apply(GRAPH, "layout.select-gemm", options={"gemm": "blas", "target": onnx_like})
    assert _gemms(graph) == ["torch", "torch"]
    assert ("layout/select-gemm: nothing to choose for target 'onnxruntime' "
            "(it brings its own GEMMs)") in rec.notes
    # a name alone (no target object to ask): nothing is chosen, and the log says why
    graph, rec = apply(GRAPH, "layout.select-gemm", options={"gemm": "blas", "target": "python"})
    assert _gemms(graph) == ["torch", "torch"]
    assert any("no target object" in n for n in rec.notes), rec.notes
    # the real onnxruntime target answers the same
    graph, rec = apply(GRAPH, "layout.select-gemm",
                       options={"gemm": "blas", "target": get_target("onnxruntime")})
    assert _gemms(graph) == ["torch", "torch"]
    assert any("it brings its own GEMMs" in n for n in rec.notes)


@needs_blas
def test_auto_with_the_python_target_times_each_shape_and_logs_both_rates():
    opts = _opts(get_target("python"))
    graph, rec = apply(GRAPH, "layout.select-gemm", options=opts)
    lines = [n for n in rec.notes if "GFLOP/s" in n]
    assert len(lines) == 2, rec.notes  # two distinct shapes, M = 4 * 64
    assert all("M=256" in n and "torch" in n and "OpenBLAS" in n for n in lines)
    assert set(_gemms(graph)) <= {"torch", "blas"}
    # the same shapes again: the timings are reused, and so is every choice
    graph2, rec2 = apply(GRAPH, "layout.select-gemm", options=opts)
    assert all("timed earlier" in n for n in rec2.notes if "GFLOP/s" in n)
    assert _gemms(graph2) == _gemms(graph)


def test_bad_option_and_bad_attr_are_typed_errors():
    graph = parse_graph(GRAPH)
    from transfuse.passes.manager import run_passes

    with pytest.raises(PassError, match="gemm must be"):
        run_passes(graph, ["layout.select-gemm"], options={"gemm": "mkl"})
    bad = parse_graph(GRAPH.replace('{activation="gelu"}', '{gemm="cublas"}'))
    with pytest.raises(IRVerifyError, match="gemm must be one of"):
        verify(bad)


@needs_blas
def test_o2_end_to_end_blas_codegen_and_artifact(tmp_path):
    model, inputs, dyn = get_model("gpt2-tiny", seq=24)
    compiled = transfuse.optimize(model, inputs, dynamic=dyn, level="O2",
                                  options={"gemm": "blas"})
    assert "_gemm_linear(" in compiled.source and ", True)" in compiled.source
    # weights read only by blas linears are stored K-major, and the graph shares that storage
    kmajor = compiled.program.kmajor_weights
    assert kmajor
    for name in kmajor:
        t = compiled.graph.constants[name].const
        assert t.stride() == (1, t.shape[0]) and t is compiled.program.constants[name]
    assert "wte" not in " ".join(kmajor)  # the tied embedding keeps its row layout
    rec = next(r for r in compiled.pass_log.records if r.name == "layout.select-gemm")
    assert any(f"stores {len(kmajor)} weight(s) K-major" in n for n in rec.notes), rec.notes
    with torch.inference_mode():
        want = model(*inputs)
        got = compiled(*inputs)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    compiled.save(tmp_path / "m")
    loaded = transfuse.load(tmp_path / "m")
    assert set(_gemms(loaded.graph)) == {"blas"}
    assert sorted(loaded.program.kmajor_weights) == sorted(kmajor)
    with torch.inference_mode():
        assert torch.equal(loaded(*inputs), got)
    # the ONNX Runtime target ignores the choice (it has its own GEMMs)
    ort = transfuse.optimize(model, inputs, dynamic=dyn, level="O2", target="onnxruntime",
                             options={"gemm": "blas"})
    assert set(_gemms(ort.graph)) == {"torch"}
