"""The rewrite engine: captures, alternatives with tags, commutative matching, repeated
captures, attr constraints, the other-user refusal, near misses and statistics; per-run
pass state (``state_factory``, ``m.state``, ``finish``) and rules that replace several
matched values (``also_replaces``)."""

from __future__ import annotations

import pytest
from pass_helpers import apply, assert_graph

from transfuse.errors import PassError
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


# -- per-run state -----------------------------------------------------------------------------


def _within_budget(m) -> str | None:
    return None if m.state["left"] > 0 else "the run's budget of rewrites is spent"


def _silu_spending(m, b):
    m.state["left"] -= 1
    b.state["made"].append(m.root.outputs[0].name)
    return b.op("silu", m["x"])


class _BudgetPass(RewritePass):
    """One silu per run: the check reads the run's state, replace spends it, finish reports."""

    name = "test.rewrite-budget"
    rule_list = [Rule("test/silu-budget", SILU.pattern, _silu_spending, _within_budget)]
    state_factory = staticmethod(lambda ctx: {"left": 1, "made": []})

    def finish(self, graph, ctx, state) -> None:
        ctx.note(f"rewrote {state['made']}, {state['left']} left")


register_pass(_BudgetPass)

TWO_SILUS = """
graph main(%a: f32[4], %b: f32[4]) {
  %0: f32[4] = sigmoid(%a)
  %1: f32[4] = mul(%a, %0)
  %2: f32[4] = sigmoid(%b)
  %3: f32[4] = mul(%2, %b)
  return %1, %3
}"""


def test_rules_share_per_run_state_and_each_run_gets_a_fresh_one():
    for _ in range(2):  # a second run starts with a full budget again
        graph, rec = apply(TWO_SILUS, "test.rewrite-budget", rtol=1e-5, atol=1e-6)
        assert_graph(graph, """
graph main(%a: f32[4], %b: f32[4]) {
  %0: f32[4] = silu(%a)
  %1: f32[4] = sigmoid(%b)
  %2: f32[4] = mul(%1, %b)
  return %0, %2
}""")
        assert rec.matched("test/silu-budget") == 1
        (miss,) = [m for m in rec.near_misses if m.rule == "test/silu-budget"]
        assert "budget of rewrites is spent" in miss.reason and miss.node.outputs == "%3"
        assert rec.notes == ["rewrote ['1'], 0 left"]


def test_a_pass_without_state_gives_rules_none():
    seen = []
    rule = Rule("test/silu-stateless", SILU.pattern,
                lambda m, b: (seen.append((m.state, b.state)), b.op("silu", m["x"]))[1])

    class _Stateless(RewritePass):
        name = "test.rewrite-stateless"
        rule_list = [rule]

    register_pass(_Stateless)
    apply(TWO_SILUS, "test.rewrite-stateless", rtol=1e-5, atol=1e-6)
    assert seen == [(None, None), (None, None)]


# -- several replaced values ------------------------------------------------------------------


def _add_rms(m, b):
    node = b.create("add_norm", [m["x"], m["r"], m["w"]],
                    {"kind": "rms", **m.node("norm").attrs})
    return node.outputs  # (normed, sum): the root's output, then also_replaces


_ADD_RMS_PATTERN = P.op("rms_norm", P.op("add", P.any("x"), P.any("r"), name="sum"), P.any("w"),
                        name="norm")
ADD_RMS = Rule(id="test/add-rms", pattern=_ADD_RMS_PATTERN, replace=_add_rms,
               also_replaces=("sum",))


class _AddRmsPass(RewritePass):
    name = "test.rewrite-add-rms"
    rule_list = [ADD_RMS]


register_pass(_AddRmsPass)

SUM_USED_BEFORE_THE_NORM = """
graph main(%x: f32[seq, 8], %r: f32[seq, 8], %v: f32[8]) {
  %0: f32[seq, 8] = add(%x, %r)
  %1: f32[seq, 8] = relu(%0)
  %2: f32[8] = exp(%v)
  %3: f32[seq, 8] = rms_norm(%0, %2) {eps=1e-06}
  %4: f32[seq, 8] = mul(%1, %3)
  return %4, %0
}"""


def test_replace_returns_the_root_output_and_a_matched_value_with_outside_users():
    graph, rec = apply(SUM_USED_BEFORE_THE_NORM.replace("relu(%0)", "relu(%x)"),
                       "test.rewrite-add-rms")
    # the sum's other user (the graph output) moves to add_norm's output 1
    assert_graph(graph, """
graph main(%x: f32[seq, 8], %r: f32[seq, 8], %v: f32[8]) {
  %1: f32[seq, 8] = relu(%x)
  %2: f32[8] = exp(%v)
  %3: f32[seq, 8], %0: f32[seq, 8] = add_norm(%x, %r, %2) {kind="rms", eps=1e-06, upcast}
  %4: f32[seq, 8] = mul(%1, %3)
  return %4, %0
}""")
    (event,) = rec.events
    assert [n.op for n in event.matched] == ["add", "rms_norm"]  # in graph order
    assert [n.op for n in event.new] == ["add_norm"]
    assert graph.find("add_norm")[0].meta["origin"] == "test.rewrite-add-rms/test/add-rms"


def test_new_nodes_go_before_the_first_user_of_a_replaced_value():
    graph, rec = apply("""
graph main(%x: f32[seq, 8], %r: f32[seq, 8], %v: f32[8]) {
  %2: f32[8] = neg(%v)
  %0: f32[seq, 8] = add(%x, %r)
  %1: f32[seq, 8] = relu(%0)
  %3: f32[seq, 8] = rms_norm(%0, %2) {eps=1e-06}
  %4: f32[seq, 8] = mul(%1, %3)
  return %4, %0
}""", "test.rewrite-add-rms")
    assert_graph(graph, """
graph main(%x: f32[seq, 8], %r: f32[seq, 8], %v: f32[8]) {
  %2: f32[8] = neg(%v)
  %3: f32[seq, 8], %0: f32[seq, 8] = add_norm(%x, %r, %2) {kind="rms", eps=1e-06, upcast}
  %1: f32[seq, 8] = relu(%0)
  %4: f32[seq, 8] = mul(%1, %3)
  return %4, %0
}""")
    assert rec.matched("test/add-rms") == 1


def test_an_input_computed_after_the_first_use_of_a_replaced_value_is_a_near_miss():
    graph, rec = apply(SUM_USED_BEFORE_THE_NORM, "test.rewrite-add-rms")
    assert_graph(graph, SUM_USED_BEFORE_THE_NORM)
    (miss,) = [m for m in rec.near_misses if m.rule == "test/add-rms"]
    assert miss.reason == "w %2 is computed after the sum's first use (relu %1)"


def test_a_rule_that_returns_too_few_values_or_names_no_matched_value_is_a_pass_error():
    text = SUM_USED_BEFORE_THE_NORM.replace("relu(%0)", "relu(%x)")
    for name, rule in (
        ("test.rewrite-add-rms-short",
         Rule("test/short", _ADD_RMS_PATTERN, lambda m, b: _add_rms(m, b)[0], None, 2, ("sum",))),
        ("test.rewrite-add-rms-input",
         Rule("test/input", _ADD_RMS_PATTERN, _add_rms, None, 2, ("x",))),
    ):
        register_pass(type("_Bad", (RewritePass,), {"name": name, "rule_list": [rule]}))
        with pytest.raises(PassError, match="1 values for 2|'x', which is not an output"):
            run_passes(parse_graph(text), [name])
