"""recognize.fuse-rotary: rotate-half and interleaved RoPE -> rotary(x, cos, sin)."""

from __future__ import annotations

import pytest
import torch
from pass_helpers import assert_graph
from recognize_helpers import fuse, misses

from transfuse.ir.interpret import interpret
from transfuse.ir.parser import parse_graph

PASS = "recognize.fuse-rotary"

# x [B, H, S, D=8], cos/sin [S, D]
ROTATE_HALF = """
graph main(%x: f32[batch, 2, seq, 8], %cos: f32[seq, 8], %sin: f32[seq, 8]) {
  %0: f32[batch, 2, seq, 8] = mul(%x, %cos)
  %1: f32[batch, 2, seq, 4] = slice(%x) {axis=3, start=4, end=8}
  %2: f32[batch, 2, seq, 4] = neg(%1)
  %3: f32[batch, 2, seq, 4] = slice(%x) {axis=3, end=4}
  %4: f32[batch, 2, seq, 8] = concat(%2, %3) {axis=3}
  %5: f32[batch, 2, seq, 8] = mul(%sin, %4)
  %6: f32[batch, 2, seq, 8] = add(%5, %0)
  return %6
}"""

# x [B, S, H, D=8] (GPT-J layout), cos/sin [S, 1, D] with each frequency in neighbouring pairs
GPTJ = """
graph main(%x: f32[batch, seq, 2, 8], %cos: f32[seq, 1, 8], %sin: f32[seq, 1, 8]) {
  %0: f32[batch, seq, 2, 4] = slice(%x) {axis=3, end=8, step=2}
  %1: f32[batch, seq, 2, 4] = slice(%x) {axis=3, start=1, end=8, step=2}
  %2: f32[batch, seq, 2, 4] = neg(%1)
  %3: f32[batch, seq, 2, 4, 1] = reshape(%2) {shape=[batch, seq, 2, 4, 1]}
  %4: f32[batch, seq, 2, 4, 1] = reshape(%0) {shape=[batch, seq, 2, 4, 1]}
  %5: f32[batch, seq, 2, 4, 2] = concat(%3, %4) {axis=4}
  %6: f32[batch, seq, 2, 8] = reshape(%5) {shape=[batch, seq, 2, 8]}
  %7: f32[batch, seq, 2, 8] = mul(%x, %cos)
  %8: f32[batch, seq, 2, 8] = mul(%6, %sin)
  %9: f32[batch, seq, 2, 8] = add(%7, %8)
  return %9
}"""

# the same rotation from x.reshape(..., 4, 2).unbind(-1) (fold-views removed the even reshapes)
UNBIND = """
graph main(%x: f32[batch, seq, 2, 8], %cos: f32[seq, 1, 8], %sin: f32[seq, 1, 8]) {
  %0: f32[batch, seq, 2, 4, 2] = reshape(%x) {shape=[batch, seq, 2, 4, 2]}
  %1: f32[batch, seq, 2, 4, 1], %2: f32[batch, seq, 2, 4, 1] = split(%0) {axis=4, sizes=[1, 1]}
  %3: f32[batch, seq, 2, 4] = reshape(%2) {shape=[batch, seq, 2, 4]}
  %4: f32[batch, seq, 2, 4] = neg(%3)
  %5: f32[batch, seq, 2, 4, 1] = reshape(%4) {shape=[batch, seq, 2, 4, 1]}
  %6: f32[batch, seq, 2, 4, 2] = concat(%5, %1) {axis=4}
  %7: f32[batch, seq, 2, 8] = reshape(%6) {shape=[batch, seq, 2, 8]}
  %8: f32[batch, seq, 2, 8] = mul(%x, %cos)
  %9: f32[batch, seq, 2, 8] = mul(%7, %sin)
  %10: f32[batch, seq, 2, 8] = add(%8, %9)
  return %10
}"""


def _rotary(text: str, interleaved: bool) -> str:
    header = text.strip().splitlines()[0]
    shape = header.split("%x: ")[1].split("], ")[0] + "]"
    attrs = " {interleaved}" if interleaved else ""
    return f"""
{header}
  %0: {shape} = rotary(%x, %cos, %sin){attrs}
  return %0
}}"""


def test_rotate_half():
    graph, rec = fuse(ROTATE_HALF, PASS)  # the op computes exactly this: bit-exact
    assert_graph(graph, _rotary(ROTATE_HALF, False))
    assert rec.matched("rope/rotate-half") == 1


@pytest.mark.parametrize("text", [GPTJ, UNBIND], ids=["strided-slices", "unbind"])
def test_interleaved(text):
    graph, rec = fuse(text, PASS)
    assert_graph(graph, _rotary(text, True))
    assert rec.matched("rope/interleaved") == 1
    # an interleaved rotation is never taken for rotate-half
    assert rec.matched("rope/rotate-half") == 0


def test_interleaved_from_pair_selects():
    graph, rec = fuse("""
graph main(%x: f32[batch, 2, seq, 8], %cos: f32[seq, 8], %sin: f32[seq, 8]) {
  %0: f32[batch, 2, seq, 4, 2] = reshape(%x) {shape=[batch, 2, seq, 4, 2]}
  %1: f32[batch, 2, seq, 4, 1] = slice(%0) {axis=4, end=1}
  %2: f32[batch, 2, seq, 4, 1] = slice(%0) {axis=4, start=1, end=2}
  %3: f32[batch, 2, seq, 4, 1] = neg(%2)
  %4: f32[batch, 2, seq, 4, 2] = concat(%3, %1) {axis=-1}
  %5: f32[batch, 2, seq, 8] = reshape(%4) {shape=[batch, 2, seq, 8]}
  %6: f32[batch, 2, seq, 8] = mul(%cos, %x)
  %7: f32[batch, 2, seq, 8] = mul(%sin, %5)
  %8: f32[batch, 2, seq, 8] = add(%6, %7)
  return %8
}""", PASS)
    (node,) = graph.find("rotary")
    assert node.attrs["interleaved"] and len(graph) == 1


# gpt-fast: pairs rotated by hand with half-width tables; x.view(B, S, H, D).reshape(..., D/2, 2)
# was folded to one reshape of the projection [B, S, H*D]
GPT_FAST = """
graph main(%q: f32[batch, seq, 16], %cos: f32[seq, 1, 4], %sin: f32[seq, 1, 4]) {
  %0: f32[batch, seq, 2, 4, 2] = reshape(%q) {shape=[batch, seq, 2, 4, 2]}
  %1: f32[batch, seq, 2, 4, 1] = slice(%0) {axis=4, end=1}
  %2: f32[batch, seq, 2, 4] = reshape(%1) {shape=[batch, seq, 2, 4]}
  %3: f32[batch, seq, 2, 4] = mul(%2, %cos)
  %4: f32[batch, seq, 2, 4, 1] = slice(%0) {axis=4, start=1, end=2}
  %5: f32[batch, seq, 2, 4] = reshape(%4) {shape=[batch, seq, 2, 4]}
  %6: f32[batch, seq, 2, 4] = mul(%5, %sin)
  %7: f32[batch, seq, 2, 4] = sub(%3, %6)
  %8: f32[batch, seq, 2, 4] = mul(%5, %cos)
  %9: f32[batch, seq, 2, 4] = mul(%2, %sin)
  %10: f32[batch, seq, 2, 4] = add(%8, %9)
  %11: f32[batch, seq, 2, 4, 1] = reshape(%7) {shape=[batch, seq, 2, 4, 1]}
  %12: f32[batch, seq, 2, 4, 1] = reshape(%10) {shape=[batch, seq, 2, 4, 1]}
  %13: f32[batch, seq, 2, 4, 2] = concat(%11, %12) {axis=4}
  %14: f32[batch, seq, 2, 8] = reshape(%13) {shape=[batch, seq, 2, 8]}
  return %14
}"""


def test_pairwise_rotation_with_half_width_tables():
    graph, rec = fuse(GPT_FAST, PASS)  # bit-exact: x·c + (-y)·s == x·c - y·s
    assert_graph(graph, """
graph main(%q: f32[batch, seq, 16], %cos: f32[seq, 1, 4], %sin: f32[seq, 1, 4]) {
  %0: f32[batch, seq, 2, 8] = reshape(%q) {shape=[batch, seq, 2, 8]}
  %1: f32[seq, 1, 4, 1] = reshape(%cos) {shape=[seq, 1, 4, 1]}
  %2: f32[seq, 1, 4, 2] = expand(%1) {shape=[seq, 1, 4, 2]}
  %3: f32[seq, 1, 8] = reshape(%2) {shape=[seq, 1, 8]}
  %4: f32[seq, 1, 4, 1] = reshape(%sin) {shape=[seq, 1, 4, 1]}
  %5: f32[seq, 1, 4, 2] = expand(%4) {shape=[seq, 1, 4, 2]}
  %6: f32[seq, 1, 8] = reshape(%5) {shape=[seq, 1, 8]}
  %7: f32[batch, seq, 2, 8] = rotary(%0, %3, %6) {interleaved}
  return %7
}""")
    assert rec.matched("rope/interleaved-pairwise") == 1


def test_pairwise_with_mixed_up_tables_is_a_near_miss():
    # out[2i] = x0·c - x1·c is no rotation: sin must be the same table in both products
    graph, rec = fuse(GPT_FAST.replace("mul(%5, %sin)", "mul(%5, %cos)"), PASS)
    assert not graph.find("rotary")
    (miss,) = misses(rec, "rope/interleaved-pairwise")
    assert "'sin' must be the same value twice" in miss


def test_tables_computed_from_positions_stay_in_the_graph():
    graph, rec = fuse("""
graph main(%x: f32[batch, 2, seq, 8]) {
  const %inv_freq: f32[4]
  %0: i64[seq] = arange() {end=seq}
  %1: f32[seq] = cast(%0) {dtype=f32}
  %2: f32[seq, 1] = reshape(%1) {shape=[seq, 1]}
  %3: f32[seq, 4] = mul(%2, %inv_freq)
  %4: f32[seq, 8] = concat(%3, %3) {axis=1}
  %cos: f32[seq, 8] = cos(%4)
  %sin: f32[seq, 8] = sin(%4)
  %5: f32[batch, 2, seq, 8] = mul(%x, %cos)
  %6: f32[batch, 2, seq, 4] = slice(%x) {axis=3, start=4, end=8}
  %7: f32[batch, 2, seq, 4] = neg(%6)
  %8: f32[batch, 2, seq, 4] = slice(%x) {axis=3, end=4}
  %9: f32[batch, 2, seq, 8] = concat(%7, %8) {axis=3}
  %10: f32[batch, 2, seq, 8] = mul(%9, %sin)
  %11: f32[batch, 2, seq, 8] = add(%5, %10)
  return %11
}""", PASS)
    (node,) = graph.find("rotary")
    assert [v.producer.op for v in node.inputs[1:]] == ["cos", "sin"]
    assert graph.find("arange") and not graph.find("slice")


def test_the_op_rotates_pairs_by_the_angle():
    """rotary(interleaved) on a unit vector per pair equals the 2-D rotation by θ."""
    graph = parse_graph(_rotary(GPTJ, True))
    theta = torch.linspace(0.1, 1.0, 4)
    cos = theta.cos().repeat_interleave(2).expand(3, 1, 8)
    sin = theta.sin().repeat_interleave(2).expand(3, 1, 8)
    x = torch.tensor([1.0, 0.0] * 4).expand(1, 3, 2, 8)
    (out,) = interpret(graph, [x, cos.contiguous(), sin.contiguous()])
    torch.testing.assert_close(out[0, 0, 0, 0::2], theta.cos())
    torch.testing.assert_close(out[0, 0, 0, 1::2], theta.sin())


@pytest.mark.parametrize("first,second,reason", [
    # cat(-x[..., :4], x[..., 4:]): the rotation by -θ, not RoPE's
    ("{axis=3, end=4}", "{axis=3, start=4, end=8}", "x1 is not the first half"),
    # cat(-x[..., 1::2], x[..., ::2]) without stacking: a permutation, not a rotation
    ("{axis=3, start=1, end=8, step=2}", "{axis=3, end=8, step=2}", "x1 is not the first half"),
])
def test_wrong_halves_are_near_misses(first, second, reason):
    text = ROTATE_HALF.replace("{axis=3, start=4, end=8}", "FIRST").replace(
        "{axis=3, end=4}", "SECOND").replace("FIRST", first).replace("SECOND", second)
    graph, rec = fuse(text, PASS)
    assert not graph.find("rotary")
    reasons = misses(rec, "rope/rotate-half")
    assert any(reason in r for r in reasons), reasons


def test_interleaved_with_the_wrong_pair_element_is_a_near_miss():
    text = GPTJ.replace("{axis=3, start=1, end=8, step=2}", "{axis=3, end=8, step=2}")
    graph, rec = fuse(text, PASS)
    assert not graph.find("rotary")
    (miss,) = misses(rec, "rope/interleaved")
    assert "odd is not x[..., 1::2]" in miss


def test_tables_that_enlarge_x_are_a_near_miss():
    text = """
graph main(%x: f32[1, 2, seq, 8], %cos: f32[3, 2, seq, 8], %sin: f32[seq, 8]) {
  %0: f32[3, 2, seq, 8] = mul(%x, %cos)
  %1: f32[1, 2, seq, 4] = slice(%x) {axis=3, start=4, end=8}
  %2: f32[1, 2, seq, 4] = neg(%1)
  %3: f32[1, 2, seq, 4] = slice(%x) {axis=3, end=4}
  %4: f32[1, 2, seq, 8] = concat(%2, %3) {axis=3}
  %5: f32[1, 2, seq, 8] = mul(%sin, %4)
  %6: f32[3, 2, seq, 8] = add(%5, %0)
  return %6
}"""
    graph, rec = fuse(text, PASS)
    assert not graph.find("rotary")
    (miss,) = misses(rec, "rope/rotate-half")
    assert "keeps x's shape" in miss
