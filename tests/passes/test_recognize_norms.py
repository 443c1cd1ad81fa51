"""recognize.fuse-norms: LayerNorm / RMSNorm decompositions -> layer_norm / rms_norm."""

from __future__ import annotations

import torch
from pass_helpers import assert_graph
from recognize_helpers import fuse, misses

PASS = "recognize.fuse-norms"

LAYER_NORM = """
graph main(%x: f32[batch, seq, 8]) {
  const %w: f32[8]
  const %b: f32[8]
  const %two: f32[] = 2.0
  const %eps: f32[] = 1e-05
  %0: f32[batch, seq, 1] = reduce_mean(%x) {axes=[2], keepdim}
  %1: f32[batch, seq, 8] = sub(%x, %0)
  %2: f32[batch, seq, 8] = pow(%1, %two)
  %3: f32[batch, seq, 1] = reduce_mean(%2) {axes=[-1], keepdim}
  %4: f32[batch, seq, 1] = add(%3, %eps)
  %5: f32[batch, seq, 1] = rsqrt(%4)
  %6: f32[batch, seq, 8] = mul(%1, %5)
  %7: f32[batch, seq, 8] = mul(%6, %w)
  %8: f32[batch, seq, 8] = add(%b, %7)
  return %8
}"""


def test_layer_norm_with_affine():
    graph, rec = fuse(LAYER_NORM, PASS, rtol=1e-5, atol=1e-5)
    assert_graph(graph, """
graph main(%x: f32[batch, seq, 8]) {
  const %w: f32[8]
  const %b: f32[8]
  %0: f32[batch, seq, 8] = layer_norm(%x, %w, %b) {eps=9.999999747378752e-06}
  return %0
}""")
    assert rec.matched("norm/layer-norm") == 1
    assert rec.matched("norm/layer-norm-weight") == 1 and rec.matched("norm/layer-norm-bias") == 1
    # the epsilon is the graph's fp32 constant, exactly
    assert graph.find("layer_norm")[0].attrs["eps"] == float(torch.tensor(1e-5))


def test_layer_norm_sqrt_div_and_mul_self_without_affine():
    graph, rec = fuse("""
graph main(%x: f32[seq, 4, 8]) {
  const %eps: f32[] = 1e-06
  %0: f32[seq, 1, 1] = reduce_mean(%x) {axes=[1, 2], keepdim}
  %1: f32[seq, 4, 8] = sub(%x, %0)
  %2: f32[seq, 4, 8] = mul(%1, %1)
  %3: f32[seq, 1, 1] = reduce_mean(%2) {axes=[1, 2], keepdim}
  %4: f32[seq, 1, 1] = add(%eps, %3)
  %5: f32[seq, 1, 1] = sqrt(%4)
  %6: f32[seq, 4, 8] = div(%1, %5)
  return %6
}""", PASS, rtol=1e-5, atol=1e-5)
    (ln,) = graph.find("layer_norm")
    assert ln.attrs["normalized_ndim"] == 2 and len(graph) == 1
    assert rec.matched("norm/layer-norm") == 1


def test_layer_norm_in_fp32_keeps_casts_and_bf16_affine():
    graph, rec = fuse("""
graph main(%x: bf16[seq, 8]) {
  const %w: bf16[8]
  const %b: bf16[8]
  const %two: f32[] = 2.0
  const %eps: f32[] = 1e-05
  %0: f32[seq, 8] = cast(%x) {dtype=f32}
  %1: f32[seq, 1] = reduce_mean(%0) {axes=[1], keepdim}
  %2: f32[seq, 8] = sub(%0, %1)
  %3: f32[seq, 8] = pow(%2, %two)
  %4: f32[seq, 1] = reduce_mean(%3) {axes=[1], keepdim}
  %5: f32[seq, 1] = add(%4, %eps)
  %6: f32[seq, 1] = rsqrt(%5)
  %7: f32[seq, 8] = mul(%2, %6)
  %8: bf16[seq, 8] = cast(%7) {dtype=bf16}
  %9: bf16[seq, 8] = mul(%8, %w)
  %10: bf16[seq, 8] = add(%9, %b)
  return %10
}""", PASS, rtol=1e-2, atol=1e-2)
    assert_graph(graph, """
graph main(%x: bf16[seq, 8]) {
  const %w: bf16[8]
  const %b: bf16[8]
  %0: f32[seq, 8] = cast(%x) {dtype=f32}
  %1: f32[seq, 8] = layer_norm(%0, _, _) {eps=9.999999747378752e-06}
  %2: bf16[seq, 8] = cast(%1) {dtype=bf16}
  %3: bf16[seq, 8] = mul(%2, %w)
  %4: bf16[seq, 8] = add(%3, %b)
  return %4
}""")
    (miss,) = misses(rec, "norm/layer-norm-weight")
    assert "after the cast back" in miss


def test_layer_norm_over_a_leading_axis_is_a_near_miss():
    text = LAYER_NORM.replace("{axes=[-1], keepdim}", "{axes=[1], keepdim}").replace(
        "{axes=[2], keepdim}", "{axes=[1], keepdim}").replace(
        "f32[batch, seq, 1] = reduce_mean", "f32[batch, 1, 8] = reduce_mean").replace(
        "%4: f32[batch, seq, 1]", "%4: f32[batch, 1, 8]").replace(
        "%5: f32[batch, seq, 1]", "%5: f32[batch, 1, 8]")
    graph, rec = fuse(text, PASS)
    assert not graph.find("layer_norm")
    (miss,) = misses(rec, "norm/layer-norm")
    assert "not the trailing dims" in miss


def test_layer_norm_centred_value_reused_blocks_the_rewrite():
    text = LAYER_NORM.replace("  return %8\n", "  return %8, %1\n")
    graph, rec = fuse(text, PASS)
    assert rec.matched("norm/layer-norm") == 0
    (miss,) = misses(rec, "norm/layer-norm")
    assert "graph output" in miss


RMS_LLAMA = """
graph main(%x: bf16[batch, seq, 8]) {
  const %w: bf16[8]
  const %two: f32[] = 2.0
  const %eps: f32[] = 1e-06
  %0: f32[batch, seq, 8] = cast(%x) {dtype=f32}
  %1: f32[batch, seq, 8] = pow(%0, %two)
  %2: f32[batch, seq, 1] = reduce_mean(%1) {axes=[2], keepdim}
  %3: f32[batch, seq, 1] = add(%2, %eps)
  %4: f32[batch, seq, 1] = rsqrt(%3)
  %5: f32[batch, seq, 8] = mul(%0, %4)
  %6: bf16[batch, seq, 8] = cast(%5) {dtype=bf16}
  %7: bf16[batch, seq, 8] = mul(%w, %6)
  return %7
}"""


def test_rms_norm_llama_upcast_is_bit_exact():
    graph, rec = fuse(RMS_LLAMA, PASS)  # rms_norm {upcast} computes exactly this: no tolerance
    assert_graph(graph, """
graph main(%x: bf16[batch, seq, 8]) {
  const %w: bf16[8]
  %0: bf16[batch, seq, 8] = rms_norm(%x, %w) {eps=9.999999974752427e-07}
  return %0
}""")
    for rule in ("norm/rms-norm", "norm/rms-norm-upcast", "norm/rms-norm-weight"):
        assert rec.matched(rule) == 1, rule
    assert graph.find("rms_norm")[0].attrs["upcast"] is True


def test_rms_norm_gemma_offset_and_no_weight():
    graph, rec = fuse("""
graph main(%x: f32[seq, 8], %w: f32[8]) {
  const %one: f32[] = 1.0
  const %eps: f32[] = 1e-06
  %0: f32[seq, 8] = mul(%x, %x)
  %1: f32[seq, 1] = reduce_mean(%0) {axes=[1], keepdim}
  %2: f32[seq, 1] = add(%1, %eps)
  %3: f32[seq, 1] = rsqrt(%2)
  %4: f32[seq, 8] = mul(%3, %x)
  %5: f32[8] = add(%one, %w)
  %6: f32[seq, 8] = mul(%4, %5)
  return %6
}""", PASS)
    assert_graph(graph, """
graph main(%x: f32[seq, 8], %w: f32[8]) {
  %0: f32[seq, 8] = rms_norm(%x, %w) {eps=9.999999974752427e-07, offset=1.0, upcast=false}
  return %0
}""")
    assert rec.matched("norm/rms-norm-weight") == 1
    no_weight = RMS_LLAMA.replace("  %7: bf16[batch, seq, 8] = mul(%w, %6)\n", "")
    graph, rec = fuse(no_weight.replace("return %7", "return %6"), PASS)
    assert_graph(graph, """
graph main(%x: bf16[batch, seq, 8]) {
  %0: bf16[batch, seq, 8] = rms_norm(%x, _) {eps=9.999999974752427e-07}
  return %0
}""")


def test_rms_norm_weight_in_fp32_before_the_cast_is_a_near_miss():
    # Gemma in bf16: (h * (1 + w)).to(bf16) — not rms_norm {upcast}'s order (cast, then weight)
    graph, rec = fuse("""
graph main(%x: bf16[seq, 8]) {
  const %w1: f32[8]
  const %two: f32[] = 2.0
  const %eps: f32[] = 1e-06
  %0: f32[seq, 8] = cast(%x) {dtype=f32}
  %1: f32[seq, 8] = pow(%0, %two)
  %2: f32[seq, 1] = reduce_mean(%1) {axes=[1], keepdim}
  %3: f32[seq, 1] = add(%2, %eps)
  %4: f32[seq, 1] = rsqrt(%3)
  %5: f32[seq, 8] = mul(%0, %4)
  %6: f32[seq, 8] = mul(%5, %w1)
  %7: bf16[seq, 8] = cast(%6) {dtype=bf16}
  return %7
}""", PASS)
    assert_graph(graph, """
graph main(%x: bf16[seq, 8]) {
  const %w1: f32[8]
  %0: f32[seq, 8] = cast(%x) {dtype=f32}
  %1: f32[seq, 8] = rms_norm(%0, %w1) {eps=9.999999974752427e-07, upcast=false}
  %2: bf16[seq, 8] = cast(%1) {dtype=bf16}
  return %2
}""")
    (miss,) = misses(rec, "norm/rms-norm-upcast")
    assert "before the cast back" in miss


def test_rms_norm_bad_epsilon_and_weight_shape_are_near_misses():
    graph, rec = fuse(RMS_LLAMA.replace("const %eps: f32[] = 1e-06", "const %eps: f32[] = 0.0"),
                       PASS)
    assert not graph.find("rms_norm")
    (miss,) = misses(rec, "norm/rms-norm")
    assert "epsilon 0.0 is not a finite number > 0" in miss
    # a full-size tensor is not a per-feature weight: the norm is made, the product stays
    text = RMS_LLAMA.replace("  const %w: bf16[8]\n", "").replace(
        "(%x: bf16[batch, seq, 8])", "(%x: bf16[batch, seq, 8], %w: bf16[seq, 8])")
    graph, rec = fuse(text, PASS)
    assert graph.find("rms_norm") and graph.find("mul")
    (miss,) = misses(rec, "norm/rms-norm-weight")
    assert "not a per-feature parameter" in miss
