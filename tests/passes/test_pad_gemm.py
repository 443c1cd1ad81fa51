"""layout.pad-gemm-columns: wide linear weights padded to 64 columns, output sliced back;
a tied embedding reads the first rows of the same padded constant."""

from __future__ import annotations

from pass_helpers import apply, assert_graph

OPTS = {"pad_gemm_min_columns": 8, "pad_gemm_multiple": 8}


def test_pads_a_tied_lm_head_and_slices_back():
    graph, rec = apply("""
graph main(%ids: i64[batch, seq]) {
  const %wte: f32[10, 4]
  %0: f32[batch, seq, 4] = embedding(%wte, %ids)
  %1: f32[batch, seq, 10] = linear(%0, %wte, _)
  return %1
}""", "layout.pad-gemm-columns", options=OPTS,
                       rtol=1e-5, atol=1e-6)
    assert_graph(graph, """
graph main(%ids: i64[batch, seq]) {
  const %wte_padded: f32[16, 4]
  %r: f32[10, 4] = slice(%wte_padded) {axis=0, end=10}
  %0: f32[batch, seq, 4] = embedding(%r, %ids)
  %1: f32[batch, seq, 16] = linear(%0, %wte_padded, _)
  %2: f32[batch, seq, 10] = slice(%1) {axis=-1, end=10}
  return %2
}""")
    assert rec.matched("layout/pad-gemm-columns") == 1
    assert float(graph.constants["wte_padded"].const[10:].abs().sum()) == 0.0
    assert "wte" not in graph.constants  # one weight in memory, not two


def test_bias_is_padded_too():
    graph, rec = apply("""
graph main(%x: f32[batch, 4]) {
  const %w: f32[12, 4]
  const %b: f32[12]
  %0: f32[batch, 12] = linear(%x, %w, %b)
  return %0
}""", "layout.pad-gemm-columns", options=OPTS,
                       rtol=1e-5, atol=1e-6)
    assert rec.matched("layout/pad-gemm-columns") == 1
    lin = graph.find("linear")[0]
    assert lin.inputs[2].type.shape == (16,)


def test_aligned_narrow_or_dynamic_weights_are_left_alone():
    text = """
graph main(%x: f32[batch, 4], %w: f32[12, 4]) {
  const %aligned: f32[16, 4]
  const %narrow: f32[6, 4]
  %0: f32[batch, 16] = linear(%x, %aligned, _)
  %1: f32[batch, 6] = linear(%x, %narrow, _)
  %2: f32[batch, 12] = linear(%x, %w, _)
  return %0, %1, %2
}"""
    graph, rec = apply(text, "layout.pad-gemm-columns", options=OPTS,
                       rtol=1e-5, atol=1e-6)
    assert rec.status == "unchanged"
    assert_graph(graph, text)


def test_can_be_disabled():
    text = """
graph main(%x: f32[batch, 4]) {
  const %w: f32[12, 4]
  %0: f32[batch, 12] = linear(%x, %w, _)
  return %0
}"""
    graph, rec = apply(text, "layout.pad-gemm-columns", options={**OPTS, "pad_gemm": False})
    assert rec.status == "unchanged"
