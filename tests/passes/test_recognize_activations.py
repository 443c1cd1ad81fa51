"""recognize.fuse-activations: GELU (erf | tanh), SiLU, SwiGLU, softmax written as math."""

from __future__ import annotations

import pytest
from pass_helpers import assert_graph
from recognize_helpers import fuse, misses

PASS = "recognize.fuse-activations"

GELU_ERF = """
graph main(%x: f32[batch, 8]) {
  const %half: f32[] = 0.5
  const %sqrt2: f32[] = 1.4142135
  const %one: f32[] = 1.0
  %0: f32[batch, 8] = mul(%x, %half)
  %1: f32[batch, 8] = div(%x, %sqrt2)
  %2: f32[batch, 8] = erf(%1)
  %3: f32[batch, 8] = add(%2, %one)
  %4: f32[batch, 8] = mul(%0, %3)
  return %4
}"""

GELU_TANH = """
graph main(%x: f32[batch, 8]) {
  const %half: f32[] = 0.5
  const %three: f32[] = 3.0
  const %k: f32[] = 0.044715
  const %c: f32[] = 0.7978846
  const %one: f32[] = 1.0
  %0: f32[batch, 8] = pow(%x, %three)
  %1: f32[batch, 8] = mul(%0, %k)
  %2: f32[batch, 8] = add(%x, %1)
  %3: f32[batch, 8] = mul(%c, %2)
  %4: f32[batch, 8] = tanh(%3)
  %5: f32[batch, 8] = add(%one, %4)
  %6: f32[batch, 8] = mul(%x, %5)
  %7: f32[batch, 8] = mul(%6, %half)
  return %7
}"""


def _gelu(approximate: str) -> str:
    attrs = ' {approximate="tanh"}' if approximate == "tanh" else ""
    return f"""
graph main(%x: f32[batch, 8]) {{
  %0: f32[batch, 8] = gelu(%x){attrs}
  return %0
}}"""


def test_gelu_erf():
    graph, rec = fuse(GELU_ERF, PASS, rtol=1e-5, atol=1e-6)
    assert_graph(graph, _gelu("none"))
    assert rec.matched("act/gelu-erf") == 1 and rec.matched("act/gelu-tanh") == 0


def test_gelu_erf_times_reciprocal_sqrt2():
    text = GELU_ERF.replace("div(%x, %sqrt2)", "mul(%rs2, %x)").replace(
        "const %sqrt2: f32[] = 1.4142135", "const %rs2: f32[] = 0.70710677")
    graph, rec = fuse(text, PASS, rtol=1e-5, atol=1e-6)
    assert_graph(graph, _gelu("none"))


def test_gelu_tanh_keeps_its_approximation():
    graph, rec = fuse(GELU_TANH, PASS, rtol=1e-5, atol=1e-6)
    assert_graph(graph, _gelu("tanh"))
    assert rec.matched("act/gelu-tanh") == 1 and rec.matched("act/gelu-erf") == 0


def test_gelu_tanh_with_x_cubed_as_products():
    text = GELU_TANH.replace("%0: f32[batch, 8] = pow(%x, %three)",
                             "%8: f32[batch, 8] = mul(%x, %x)\n  %0: f32[batch, 8] = mul(%x, %8)")
    graph, rec = fuse(text, PASS, rtol=1e-5, atol=1e-6)
    assert_graph(graph, _gelu("tanh"))


@pytest.mark.parametrize("const,value,what", [
    ("%k", "0.0447", "0.044715"),
    ("%c", "0.79788", "√(2/π)"),
    ("%half", "0.25", "1/2"),
])
def test_gelu_tanh_with_a_wrong_constant_is_not_gelu(const, value, what):
    lines = GELU_TANH.splitlines()
    old = next(line for line in lines if line.strip().startswith(f"const {const}:"))
    text = GELU_TANH.replace(old, old.rsplit("=", 1)[0] + "= " + value)
    graph, rec = fuse(text, PASS)
    assert not graph.find("gelu")
    (miss,) = misses(rec, "act/gelu-tanh")
    assert what in miss and value in miss


def test_gelu_erf_with_shared_half_x_is_refused():
    text = GELU_ERF.replace("return %4", "return %4, %0")
    graph, rec = fuse(text, PASS)
    assert not graph.find("gelu")
    (miss,) = misses(rec, "act/gelu-erf")
    assert "graph output" in miss


def test_silu_and_swiglu():
    graph, rec = fuse("""
graph main(%g: f32[batch, 16], %u: f32[batch, 16]) {
  %0: f32[batch, 16] = sigmoid(%g)
  %1: f32[batch, 16] = mul(%g, %0)
  %2: f32[batch, 16] = mul(%u, %1)
  return %2
}""", PASS, rtol=1e-6, atol=1e-6)
    assert_graph(graph, """
graph main(%g: f32[batch, 16], %u: f32[batch, 16]) {
  %0: f32[batch, 16] = swiglu(%g, %u)
  return %0
}""")
    assert rec.matched("act/silu") == 1 and rec.matched("act/swiglu") == 1


def test_swiglu_needs_equal_types():
    text = """
graph main(%g: f32[batch, 16], %u: f32[16]) {
  %0: f32[batch, 16] = silu(%g)
  %1: f32[batch, 16] = mul(%0, %u)
  return %1
}"""
    graph, rec = fuse(text, PASS)
    assert_graph(graph, text)
    (miss,) = misses(rec, "act/swiglu")
    assert "differ" in miss


def test_silu_of_another_value_is_not_silu():
    text = """
graph main(%a: f32[4], %b: f32[4]) {
  %0: f32[4] = sigmoid(%b)
  %1: f32[4] = mul(%a, %0)
  return %1
}"""
    graph, rec = fuse(text, PASS)
    assert_graph(graph, text)
    assert rec.matched("act/silu") == 0
    assert any("same value" in r for r in misses(rec, "act/silu"))


SOFTMAX_MAX = """
graph main(%x: f32[batch, 4, seq]) {
  %0: f32[batch, 4, 1] = reduce_max(%x) {axes=[2], keepdim}
  %1: f32[batch, 4, seq] = sub(%x, %0)
  %2: f32[batch, 4, seq] = exp(%1)
  %3: f32[batch, 4, 1] = reduce_sum(%2) {axes=[-1], keepdim}
  %4: f32[batch, 4, seq] = div(%2, %3)
  return %4
}"""


def test_softmax_max_subtracted_and_plain():
    graph, rec = fuse(SOFTMAX_MAX, PASS, rtol=1e-5, atol=1e-6)
    assert_graph(graph, """
graph main(%x: f32[batch, 4, seq]) {
  %0: f32[batch, 4, seq] = softmax(%x) {axis=2}
  return %0
}""")
    assert rec.matched("act/softmax-max-subtracted") == 1 and rec.matched("act/softmax") == 0
    graph, rec = fuse("""
graph main(%x: f32[batch, 6]) {
  %0: f32[batch, 6] = exp(%x)
  %1: f32[batch, 1] = reduce_sum(%0) {axes=[1], keepdim}
  %2: f32[batch, 1] = reciprocal(%1)
  %3: f32[batch, 6] = mul(%2, %0)
  return %3
}""", PASS, rtol=1e-5, atol=1e-6)
    assert_graph(graph, """
graph main(%x: f32[batch, 6]) {
  %0: f32[batch, 6] = softmax(%x) {axis=1}
  return %0
}""")
    assert rec.matched("act/softmax") == 1


def test_softmax_axes_must_agree():
    text = SOFTMAX_MAX.replace("reduce_max(%x) {axes=[2], keepdim}",
                               "reduce_max(%x) {axes=[1], keepdim}").replace(
        "%0: f32[batch, 4, 1] = reduce_max", "%0: f32[batch, 1, seq] = reduce_max")
    graph, rec = fuse(text, PASS, rtol=1e-5, atol=1e-6)
    (miss,) = misses(rec, "act/softmax-max-subtracted")
    assert "different axes" in miss
    # what remains is a plain softmax of (x - max over another axis): still the same function
    assert_graph(graph, """
graph main(%x: f32[batch, 4, seq]) {
  %0: f32[batch, 1, seq] = reduce_max(%x) {axes=[1], keepdim}
  %1: f32[batch, 4, seq] = sub(%x, %0)
  %2: f32[batch, 4, seq] = softmax(%1) {axis=2}
  return %2
}""")
