"""The rewrite engine: captures, alternatives with tags, commutative matching, repeated
captures, attr constraints, the other-user refusal, near misses and statistics."""

from __future__ import annotations

from pass_helpers import apply, assert_graph

from transfuse.ir.parser import parse_graph
from transfuse.passes.manager import run_passes
from transfuse.passes.pipelines import register_pass
from transfuse.passes.rewrite import P, RewritePass, Rule, match

# x * sigmoid(x) -> silu(x), the multiply written either way round
_x = P.any("x")
SILU = Rule(
    id="test/silu",
    pattern=P.op("mul", _x, P.op("sigmoid", _x, name="sig"), commutative=True),
    replace=lambda m, b: b.op("silu", m["x"]),
)

# softmax written as exp / sum(exp), with the division by mul-reciprocal as an alternative
_e = P.op("exp", P.any("x"), name="e")
_sum = P.op("reduce_sum", _e, attrs={"axes": (-1,), "keepdim": True})
SOFTMAX = Rule(
    id="test/softmax",
    pattern=P.alt(P.op("div", _e, _sum), P.op("mul", _e, P.op("reciprocal", _sum)),
                  tags=("div", "mul-reciprocal")),
    replace=lambda m, b: b.op("softmax", m["x"], axis=-1),
)


class _TestPass(RewritePass):
    name = "test.rewrite-engine"
    rule_list = [SILU, SOFTMAX]


register_pass(_TestPass)


def test_commutative_match_and_repeated_capture():
    graph, rec = apply("""
graph main(%a: f32[batch, 4]) {
  %0: f32[batch, 4] = sigmoid(%a)
  %1: f32[batch, 4] = mul(%0, %a)
  return %1
}""", "test.rewrite-engine", rtol=1e-5, atol=1e-6)
    assert_graph(graph, """
graph main(%a: f32[batch, 4]) {
  %0: f32[batch, 4] = silu(%a)
  return %0
}""")
    assert rec.matched("test/silu") == 1
    (event,) = [e for e in rec.events if e.rule == "test/silu"]
    assert len(event.matched) == 2 and event.new[0].op == "silu"
    assert graph.find("silu")[0].meta["origin"] == "test.rewrite-engine/test/silu"


def test_same_capture_must_be_same_value():
    text = """
graph main(%a: f32[4], %b: f32[4]) {
  %0: f32[4] = sigmoid(%b)
  %1: f32[4] = mul(%a, %0)
  return %1
}"""
    graph, rec = apply(text, "test.rewrite-engine")
    assert_graph(graph, text)
    assert rec.matched("test/silu") == 0
    (miss,) = [m for m in rec.near_misses if m.rule == "test/silu"]
    assert "same value" in miss.reason


def test_alternatives_record_tags_and_attr_constraints():
    graph, rec = apply("""
graph main(%x: f32[2, 8]) {
  %0: f32[2, 8] = exp(%x)
  %1: f32[2, 1] = reduce_sum(%0) {axes=[-1], keepdim}
  %2: f32[2, 1] = reciprocal(%1)
  %3: f32[2, 8] = mul(%0, %2)
  return %3
}""", "test.rewrite-engine", rtol=1e-5, atol=1e-6)
    assert_graph(graph, """
graph main(%x: f32[2, 8]) {
  %0: f32[2, 8] = softmax(%x)
  return %0
}""")
    assert rec.matched("test/softmax") == 1
    # a sum over another axis is not this softmax: a near miss naming the attribute
    text = """
graph main(%x: f32[2, 8]) {
  %0: f32[2, 8] = exp(%x)
  %1: f32[1, 8] = reduce_sum(%0) {axes=[0], keepdim}
  %2: f32[2, 8] = div(%0, %1)
  return %2
}"""
    graph, rec = apply(text, "test.rewrite-engine")
    assert_graph(graph, text)
    (miss,) = [m for m in rec.near_misses if m.rule == "test/softmax"]
    assert "axes" in miss.reason


def test_intermediate_with_another_user_blocks_the_rewrite():
    text = """
graph main(%x: f32[2, 8]) {
  %0: f32[2, 8] = exp(%x)
  %1: f32[2, 1] = reduce_sum(%0) {axes=[-1], keepdim}
  %2: f32[2, 8] = div(%0, %1)
  %3: f32[2, 1] = log(%1)
  return %2, %3
}"""
    graph, rec = apply(text, "test.rewrite-engine")
    assert_graph(graph, text)
    assert rec.matched("test/softmax") == 0
    (miss,) = [m for m in rec.near_misses if m.rule == "test/softmax"]
    assert "another user" in miss.reason and "log" in miss.reason


def test_match_function_reports_deepest_failure():
    graph = parse_graph("""
graph main(%x: f32[2, 8]) {
  %0: f32[2, 8] = exp(%x)
  %1: f32[2, 1] = reduce_max(%0) {axes=[-1], keepdim}
  %2: f32[2, 8] = div(%0, %1)
  return %2
}""")
    root = graph.find("div")[0]
    m, fail = match(SOFTMAX.pattern, root)
    assert m is None and "reduce_max" in fail.reason and "reduce_sum" in fail.reason


def test_statistics_and_why_not():
    graph = parse_graph("""
graph main(%a: f32[4], %b: f32[4]) {
  %0: f32[4] = sigmoid(%b)
  %1: f32[4] = mul(%a, %0)
  %2: f32[4] = sigmoid(%a)
  %3: f32[4] = mul(%2, %a)
  return %1, %3
}""")
    log = run_passes(graph, ["test.rewrite-engine"])
    rec = log.records[0]
    assert rec.rules["test/silu"]["tried"] >= 2 and rec.matched("test/silu") == 1
    text = log.why_not("test/silu")
    assert "same value" in text and "%1" in text
