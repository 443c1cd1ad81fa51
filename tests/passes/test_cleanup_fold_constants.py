import torch
from pass_helpers import apply, assert_graph

from transfuse.ir.parser import parse_graph
from transfuse.passes.manager import run_passes

PASS = "cleanup.fold-constants"


def test_folds_static_shape_arithmetic_and_constant_math():
    graph, rec = apply("""
graph main(%x: f32[batch, 8]) {
  const %two: i64[] = 2
  const %w: f32[4] = [1.0, 2.0, 3.0, 4.0]
  %0: i64[] = shape_of(%x) {axis=1}
  %1: i64[] = floor_div(%0, %two)
  %2: f32[] = cast(%1) {dtype=f32}
  %3: f32[] = rsqrt(%2)
  %4: f32[4] = mul(%w, %3)
  %5: f32[batch, 8] = mul(%x, %3)
  %6: f32[batch, 8] = relu(%5)
  return %6, %4
}""", PASS)
    assert_graph(graph, """
graph main(%x: f32[batch, 8]) {
  const %two: i64[] = 2
  const %w: f32[4] = [1.0, 2.0, 3.0, 4.0]
  const %s: f32[] = 0.5
  const %ws: f32[4] = [0.5, 1.0, 1.5, 2.0]
  %5: f32[batch, 8] = mul(%x, %s)
  %6: f32[batch, 8] = relu(%5)
  return %6, %ws
}""")
    assert rec.matched("fold/shape-of") == 1 and rec.matched("fold/constant") == 4
    assert rec.nodes_before == 7 and rec.nodes_after == 2


def test_symbolic_shapes_impure_ops_and_big_results_stay():
    text = """
graph main(%x: f32[batch, seq, 8]) {
  const %bias: f32[8]
  %0: i64[] = shape_of(%x) {axis=1}
  %1: i64[seq] = arange() {end=seq}
  %2: f32[seq, 8] = full() {shape=[seq, 8], value=0.0, dtype=f32}
  %3: f32[batch, seq, 8] = expand(%bias) {shape=[batch, seq, 8]}
  %4: f32[64, 128] = full() {shape=[64, 128], value=1.0, dtype=f32}
  %5: f32[8] = dropout(%bias) {p=0.5, train}
  return %0, %1, %2, %3, %4, %5
}"""
    graph = parse_graph(text)
    log = run_passes(graph, [PASS], verify=True)
    rec = log[0]
    assert rec.status == "unchanged"
    assert rec.matched("fold/constant") == 0 and rec.matched("fold/shape-of") == 0
    assert len(rec.near_misses) == 1
    assert "8192 elements > limit 4096" in rec.near_misses[0].reason
    assert "near miss" in log.why_not("fold/constant")


def test_size_limit_is_an_option():
    text = """
graph main(%x: f32[64, 128]) {
  %0: f32[64, 128] = full() {shape=[64, 128], value=1.0, dtype=f32}
  %1: f32[64, 128] = add(%x, %0)
  return %1
}"""
    graph, rec = apply(text, PASS, options={PASS: {"max_elements": 10000}})
    assert rec.matched("fold/constant") == 1
    (c,) = graph.constants.values()
    assert torch.equal(c.const, torch.ones(64, 128))
