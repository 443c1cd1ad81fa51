"""recognize.fuse-add-norm (residual add + norm -> add_norm with the sum as output 1) and
recognize.fold-linear-epilogue (bias add and activation -> linear)."""

from __future__ import annotations

from pass_helpers import assert_graph
from recognize_helpers import fuse, misses

ADD_NORM = "recognize.fuse-add-norm"
EPILOGUE = "recognize.fold-linear-epilogue"

PRE_NORM = """
graph main(%x: f32[batch, seq, 8], %h: f32[batch, seq, 8]) {
  const %w: f32[8]
  const %b: f32[8]
  %0: f32[batch, seq, 8] = add(%x, %h)
  %1: f32[batch, seq, 8] = layer_norm(%0, %w, %b)
  %2: f32[batch, seq, 8] = mul(%1, %1)
  %3: f32[batch, seq, 8] = add(%0, %2)
  return %3
}"""


def test_add_layer_norm_keeps_the_sum_for_the_next_residual():
    graph, rec = fuse(PRE_NORM, ADD_NORM)  # add_norm computes exactly add then layer_norm
    assert_graph(graph, """
graph main(%x: f32[batch, seq, 8], %h: f32[batch, seq, 8]) {
  const %w: f32[8]
  const %b: f32[8]
  %0: f32[batch, seq, 8], %1: f32[batch, seq, 8] = add_norm(%x, %h, %w, %b) {kind="layer", eps=1e-05}
  %2: f32[batch, seq, 8] = mul(%0, %0)
  %3: f32[batch, seq, 8] = add(%1, %2)
  return %3
}""")
    assert rec.matched("residual/add-layer-norm") == 1
    (event,) = rec.events
    assert [r.op for r in event.matched] == ["add", "layer_norm"]


def test_add_rms_norm_post_norm_and_a_sum_used_before_the_norm():
    graph, rec = fuse("""
graph main(%x: bf16[seq, 8], %h: bf16[seq, 8]) {
  const %w: bf16[8]
  %0: bf16[seq, 8] = add(%h, %x)
  %1: bf16[seq, 8] = relu(%0)
  %2: bf16[seq, 8] = rms_norm(%0, %w) {eps=1e-06, offset=1.0}
  %3: bf16[seq, 8] = mul(%1, %2)
  return %3
}""", ADD_NORM)
    assert_graph(graph, """
graph main(%x: bf16[seq, 8], %h: bf16[seq, 8]) {
  const %w: bf16[8]
  %0: bf16[seq, 8], %1: bf16[seq, 8] = add_norm(%h, %x, %w) {kind="rms", eps=1e-06, offset=1.0, upcast}
  %2: bf16[seq, 8] = relu(%1)
  %3: bf16[seq, 8] = mul(%2, %0)
  return %3
}""")
    assert rec.matched("residual/add-rms-norm") == 1


def test_norm_weight_computed_after_the_first_use_of_the_sum_is_a_near_miss():
    text = """
graph main(%x: f32[seq, 8], %h: f32[seq, 8], %v: f32[8]) {
  %0: f32[seq, 8] = add(%x, %h)
  %1: f32[seq, 8] = relu(%0)
  %2: f32[8] = exp(%v)
  %3: f32[seq, 8] = layer_norm(%0, %2, _)
  %4: f32[seq, 8] = add(%1, %3)
  return %4
}"""
    graph, rec = fuse(text, ADD_NORM)
    assert_graph(graph, text)
    (miss,) = misses(rec, "residual/add-layer-norm")
    assert "computed after the sum's first use" in miss


def test_norm_of_something_else_is_not_matched():
    text = """
graph main(%x: f32[seq, 8]) {
  %0: f32[seq, 8] = relu(%x)
  %1: f32[seq, 8] = layer_norm(%0, _, _)
  return %1
}"""
    graph, rec = fuse(text, ADD_NORM)
    assert_graph(graph, text)
    assert rec.matched("residual/add-layer-norm") == 0 and rec.rules[
        "residual/add-layer-norm"]["tried"] == 1


MLP = """
graph main(%x: f32[batch, 8]) {
  const %w: f32[16, 8]
  const %b: f32[16]
  %0: f32[batch, 16] = linear(%x, %w, _)
  %1: f32[batch, 16] = add(%b, %0)
  %2: f32[batch, 16] = gelu(%1) {approximate="tanh"}
  return %2
}"""


def test_bias_and_activation_fold_into_linear():
    graph, rec = fuse(MLP, EPILOGUE, rtol=1e-5, atol=1e-6)
    assert_graph(graph, """
graph main(%x: f32[batch, 8]) {
  const %w: f32[16, 8]
  const %b: f32[16]
  %0: f32[batch, 16] = linear(%x, %w, %b) {activation="gelu_tanh"}
  return %0
}""")
    assert rec.matched("residual/linear-bias") == 1
    assert rec.matched("residual/linear-activation") == 1


def test_activation_folds_only_when_it_is_the_linear_s_only_user():
    text = MLP.replace("return %2", "return %2, %1")
    graph, rec = fuse(text, EPILOGUE, rtol=1e-5, atol=1e-6)
    assert graph.find("gelu") and graph.find("linear")[0].attrs["activation"] is None
    assert rec.matched("residual/linear-bias") == 1
    (miss,) = misses(rec, "residual/linear-activation")
    assert "graph output" in miss
    for act, name in (("gelu", "gelu"), ("silu", "silu"), ("relu", "relu")):
        graph, rec = fuse(MLP.replace('gelu(%1) {approximate="tanh"}', f"{act}(%1)"), EPILOGUE,
                          rtol=1e-5, atol=1e-6)
        (lin,) = graph.find("linear")
        assert lin.attrs["activation"] == name and len(graph) == 1


def test_a_bias_that_is_not_per_feature_stays_an_add():
    text = """
graph main(%x: f32[batch, 8], %r: f32[batch, 16]) {
  const %w: f32[16, 8]
  %0: f32[batch, 16] = linear(%x, %w, _)
  %1: f32[batch, 16] = add(%0, %r)
  return %1
}"""
    graph, rec = fuse(text, EPILOGUE)
    assert_graph(graph, text)
    (miss,) = misses(rec, "residual/linear-bias")
    assert "is not a bias" in miss
