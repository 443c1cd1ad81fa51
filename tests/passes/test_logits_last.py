"""fusion.compute-last-logits: with logits="last", norm and LM head run on the last position."""

import pytest
import torch
from pass_helpers import assert_graph, sample_inputs

from transfuse.frontend.torch_export import capture
from transfuse.ir.interpret import interpret
from transfuse.ir.parser import parse_graph
from transfuse.ir.verify import verify
from transfuse.models import get_model
from transfuse.passes.manager import run_passes, run_pipeline

PASS = "fusion.compute-last-logits"
RULE = "logits/last-position"
LAST = {"logits": "last"}


def run(text, options=LAST, env=None):
    """Run the pass; return graph, record, outputs before and after on the same inputs."""
    graph = parse_graph(text)
    inputs = sample_inputs(graph, env)
    before = interpret(graph, inputs)
    log = run_passes(graph, [PASS], options=options)
    verify(graph)
    return graph, log.records[0], before, interpret(graph, inputs)


GPT_TAIL = """
graph main(%ids: i64[batch, seq], %h: f32[batch, seq, 8]) {
  const %ln_w: f32[8]
  const %ln_b: f32[8]
  const %lm_head: f32[11, 8]
  %m: f32[batch, seq, 8] = cumsum(%h) {axis=1}  # @h.1.attn (mixes positions, as attention does)
  %r: f32[batch, seq, 8] = add(%h, %m)  # @h.1
  %n: f32[batch, seq, 8] = layer_norm(%r, %ln_w, %ln_b)  # @ln_f
  %logits: f32[batch, seq, 11] = linear(%n, %lm_head, _)  # @lm_head
  return %logits
}"""


def test_slices_the_residual_stream_before_the_final_norm():
    graph, rec, before, after = run(GPT_TAIL)
    assert_graph(graph, """
graph main(%ids: i64[batch, seq], %h: f32[batch, seq, 8]) {
  const %ln_w: f32[8]
  const %ln_b: f32[8]
  const %lm_head: f32[11, 8]
  %m: f32[batch, seq, 8] = cumsum(%h) {axis=1}
  %h1: f32[batch, 1, 8] = slice(%h) {axis=1, start=seq-1, end=seq}
  %m1: f32[batch, 1, 8] = slice(%m) {axis=1, start=seq-1, end=seq}
  %r: f32[batch, 1, 8] = add(%h1, %m1)
  %n: f32[batch, 1, 8] = layer_norm(%r, %ln_w, %ln_b)
  %logits: f32[batch, 1, 11] = linear(%n, %lm_head, _)
  return %logits
}""")
    assert rec.matched(RULE) == 1 and rec.status == "changed"
    assert graph.meta["logits"] == "last"
    assert any("[batch, 1, 11]" in n for n in rec.notes)
    assert all(n.meta["origin"] == f"{PASS}/{RULE}" for n in graph.find("slice"))
    assert graph.find("slice")[0].source == "h.1"
    torch.testing.assert_close(after[0], before[0][:, -1:], rtol=1e-5, atol=1e-6)


def test_without_the_option_nothing_changes():
    graph, rec, _, _ = run(GPT_TAIL, options={})
    assert rec.status == "unchanged" and "logits" not in graph.meta
    assert rec.rules[RULE]["tried"] == 0


def test_decomposed_rms_norm_softcap_and_cast_after_the_head():
    graph, rec, before, after = run("""
graph main(%ids: i64[batch, seq], %h: f32[batch, seq, 8]) {
  const %two: f32[] = 2.0
  const %eps: f32[] = 1e-05
  const %w: f32[8]
  const %lm_head: f32[11, 8]
  const %cap: f32[] = 30.0
  %p: f32[batch, seq, 8] = pow(%h, %two)
  %m: f32[batch, seq, 1] = reduce_mean(%p) {axes=[2], keepdim}
  %e: f32[batch, seq, 1] = add(%m, %eps)
  %r: f32[batch, seq, 1] = rsqrt(%e)
  %x: f32[batch, seq, 8] = mul(%h, %r)
  %n: f32[batch, seq, 8] = mul(%w, %x)
  %l: f32[batch, seq, 11] = linear(%n, %lm_head, _)
  %d: f32[batch, seq, 11] = div(%l, %cap)
  %t: f32[batch, seq, 11] = tanh(%d)
  %s: f32[batch, seq, 11] = mul(%t, %cap)
  %out: f64[batch, seq, 11] = cast(%s) {dtype=f64}
  return %out
}""")
    assert rec.matched(RULE) == 1
    (sl,) = graph.find("slice")
    assert sl.inputs[0] is graph.inputs[1]  # before the whole norm
    assert str(graph.outputs[0].type) == "f64[batch, 1, 11]"
    torch.testing.assert_close(after[0], before[0][:, -1:])


def test_hidden_state_also_returned_keeps_its_positions():
    graph, rec, before, after = run("""
graph main(%ids: i64[batch, seq], %h: f32[batch, seq, 8]) {
  const %ln_w: f32[8]
  const %lm_head: f32[11, 8]
  %n: f32[batch, seq, 8] = layer_norm(%h, %ln_w, _)
  %logits: f32[batch, seq, 11] = linear(%n, %lm_head, _)
  return %logits, %n
}""")
    assert rec.matched(RULE) == 1
    (sl,) = graph.find("slice")
    assert sl.inputs[0].producer.op == "layer_norm"  # the norm output is needed whole
    assert str(graph.outputs[1].type) == "f32[batch, seq, 8]"
    torch.testing.assert_close(after[1], before[1])
    torch.testing.assert_close(after[0], before[0][:, -1:])


@pytest.mark.parametrize("tail, reason", [
    ("%out: f32[batch, seq, 11] = softmax(%logits) {axis=1}", "mixes positions"),
    ("%out: f32[batch, 1, 11] = reduce_mean(%logits) {axes=[1], keepdim}", "mixes positions"),
])
def test_refuses_when_something_after_the_head_mixes_positions(tail, reason):
    text = f"""
graph main(%ids: i64[batch, seq], %h: f32[batch, seq, 8]) {{
  const %lm_head: f32[11, 8]
  %logits: f32[batch, seq, 11] = linear(%h, %lm_head, _)
  {tail}
  return %out
}}"""
    graph, rec, _, _ = run(text)
    assert rec.status == "unchanged" and "logits" not in graph.meta
    (miss,) = rec.near_misses
    assert reason in miss.reason and miss.rule == RULE
    assert_graph(graph, text)


def test_refuses_a_head_that_is_not_b_s_v():
    text = """
graph main(%ids: i64[batch, seq], %h: f32[batch, 8]) {
  const %cls: f32[3, 8]
  %out: f32[batch, 3] = linear(%h, %cls, _)
  return %out
}"""
    graph, rec, _, _ = run(text)
    assert rec.status == "unchanged"
    assert "is not [B, S, V]" in rec.near_misses[0].reason


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])
def test_reference_models_last_position(name):
    model, inputs, dynamic = get_model(name, seq=8)
    captured = capture(model, inputs, dynamic=dynamic)
    graph = captured.graph
    run_pipeline(graph, "O1")
    ids = torch.randint(0, 1000, (1, 5))  # another length than captured: the slice is symbolic
    before = interpret(graph, [ids])[0]
    n_linear = len(graph.find("linear"))
    log = run_passes(graph, [PASS], options=LAST)
    verify(graph)
    assert log.records[0].matched(RULE) == 1
    after = interpret(graph, [ids])[0]
    assert after.shape == (1, 1, 1000)
    torch.testing.assert_close(after, before[:, -1:], rtol=1e-5, atol=1e-5)
    assert len(graph.find("linear")) == n_linear
