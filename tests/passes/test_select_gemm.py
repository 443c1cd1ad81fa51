"""layout.select-gemm: the CPU GEMM library of each linear is chosen by timing, recorded as
the linear's ``gemm`` attribute, kept through print/parse and save/load."""

from __future__ import annotations

import pytest
import torch
from pass_helpers import apply

import transfuse
from transfuse.codegen.python.blas import blas_unavailable
from transfuse.errors import IRVerifyError, PassError
from transfuse.ir.parser import parse_graph
from transfuse.ir.printer import print_graph
from transfuse.ir.verify import verify
from transfuse.models import get_model

pytestmark = pytest.mark.skipif(blas_unavailable() is not None,
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


def _gemms(graph):
    return [n.attrs["gemm"] for n in graph.find("linear")]


def test_forced_blas_marks_every_linear_and_keeps_the_math():
    graph, rec = apply(GRAPH, "layout.select-gemm", options={"gemm": "blas"})
    assert _gemms(graph) == ["blas", "blas"]
    assert rec.matched("layout/select-gemm") == 2
    text = print_graph(graph)
    assert 'gemm="blas"' in text
    again = parse_graph(text)  # the choice survives the text form
    assert _gemms(again) == ["blas", "blas"]


def test_forced_torch_changes_nothing():
    graph, rec = apply(GRAPH, "layout.select-gemm", options={"gemm": "torch"})
    assert _gemms(graph) == ["torch", "torch"] and rec.status == "unchanged"


def test_auto_times_each_shape_and_logs_both_rates():
    opts = {"sample_inputs": [torch.randn(4, 64, 64)], "select_gemm_min_columns": 1}
    graph, rec = apply(GRAPH, "layout.select-gemm", options=opts)
    lines = [n for n in rec.notes if "GFLOP/s" in n]
    assert len(lines) == 2, rec.notes  # two distinct shapes, M = 4 * 64
    assert all("M=256" in n and "torch" in n and "OpenBLAS" in n for n in lines)
    assert set(_gemms(graph)) <= {"torch", "blas"}
    # the same shapes again: the timings are reused, and so is every choice
    graph2, rec2 = apply(GRAPH, "layout.select-gemm", options=opts)
    assert all("timed earlier" in n for n in rec2.notes if "GFLOP/s" in n)
    assert _gemms(graph2) == _gemms(graph)


def test_several_threads_without_native_kernels_stay_on_torch(monkeypatch):
    from transfuse.codegen import native

    monkeypatch.setattr(native, "library", lambda: None)
    monkeypatch.setattr(native, "status", lambda: "no C compiler found")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    opts = {"sample_inputs": [torch.randn(4, 64, 64)], "select_gemm_min_columns": 1}
    graph, rec = apply(GRAPH, "layout.select-gemm", options=opts)
    assert _gemms(graph) == ["torch", "torch"]
    assert any("2 threads without the native kernels" in n and "no C compiler" in n
               for n in rec.notes), rec.notes
    # forced blas is the user's call and still honoured
    graph, _ = apply(GRAPH, "layout.select-gemm", options={**opts, "gemm": "blas"})
    assert _gemms(graph) == ["blas", "blas"]


def test_min_columns_limits_what_is_timed():
    graph, rec = apply(GRAPH, "layout.select-gemm",
                       options={"sample_inputs": [torch.randn(4, 64, 64)],
                                "select_gemm_min_columns": 8192})
    assert _gemms(graph) == ["torch", "torch"]
    assert sum("not timed (N < 8192)" in n for n in rec.notes) == 2


def test_tied_weight_is_timed_without_relayout():
    graph, rec = apply("""
graph main(%ids: i64[batch, seq]) {
  const %wte: f32[512, 64]
  %0: f32[batch, seq, 64] = embedding(%wte, %ids)
  %1: f32[batch, seq, 512] = linear(%0, %wte, _)
  return %1
}""", "layout.select-gemm", options={"sample_inputs": [torch.randint(0, 512, (2, 64))]})
    (line,) = [n for n in rec.notes if "GFLOP/s" in n]
    assert "[N, K] transposed" in line and "1 weight(s)" in line


def test_tiny_gemms_are_not_timed():
    graph, rec = apply(GRAPH, "layout.select-gemm",
                       options={"sample_inputs": [torch.randn(1, 2, 64)],
                                "select_gemm_min_columns": 1})
    assert _gemms(graph) == ["torch", "torch"]
    assert any("too small to time" in n for n in rec.notes)


def test_other_targets_are_left_alone():
    graph, rec = apply(GRAPH, "layout.select-gemm",
                       options={"gemm": "blas", "target": "onnxruntime"})
    assert _gemms(graph) == ["torch", "torch"]
    assert any("onnxruntime" in n for n in rec.notes)


def test_bad_option_and_bad_attr_are_typed_errors():
    graph = parse_graph(GRAPH)
    from transfuse.passes.manager import run_passes

    with pytest.raises(PassError, match="gemm must be"):
        run_passes(graph, ["layout.select-gemm"], options={"gemm": "mkl"})
    bad = parse_graph(GRAPH.replace('{activation="gelu"}', '{gemm="cublas"}'))
    with pytest.raises(IRVerifyError, match="gemm must be one of"):
        verify(bad)


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
