from pass_helpers import apply, assert_graph

from transfuse.ir.parser import parse_graph
from transfuse.passes.manager import run_passes

PASS = "cleanup.remove-noops"


def test_removes_every_kind_of_noop():
    graph, rec = apply("""
graph main(%x: f32[batch, 4]) {
  const %zero: f32[] = 0.0
  const %one: f32[] = 1.0
  const %m: bool[] = true
  %0: f32[batch, 4] = dropout(%x) {p=0.1}
  %1: f32[batch, 4] = identity(%0)
  %2: f32[batch, 4] = cast(%1) {dtype=f32}
  %3: f32[batch, 4] = reshape(%2) {shape=[batch, 4]}
  %4: f32[batch, 4] = expand(%3) {shape=[batch, 4]}
  %5: f32[batch, 4] = permute(%4) {perm=[0, 1]}
  %6: f32[batch, 4] = slice(%5) {axis=1, end=4}
  %7: f32[batch, 4] = slice(%6) {axis=0}
  %8: f32[batch, 4] = add(%zero, %7)
  %9: f32[batch, 4] = mul(%8, %one)
  assert(%m) {message="shape"}
  %10: f32[batch, 4] = relu(%9)
  return %10
}""", PASS)
    assert_graph(graph, """
graph main(%x: f32[batch, 4]) {
  const %zero: f32[] = 0.0
  const %one: f32[] = 1.0
  const %m: bool[] = true
  %10: f32[batch, 4] = relu(%x)
  return %10
}""")
    for rule in ("dropout", "identity", "cast", "reshape", "expand", "permute", "add-zero",
                 "mul-one", "assert"):
        assert rec.matched(f"noop/{rule}") == 1, rule
    assert rec.matched("noop/slice") == 2
    assert rec.status == "changed" and rec.nodes_before == 12 and rec.nodes_after == 1
    assert rec.op_delta["slice"] == -2
    assert any("1 runtime assert" in n for n in rec.notes)


def test_keeps_real_work():
    """Broadcasting +0, dtype-changing *1, partial slices, real casts and training dropout stay."""
    text = """
graph main(%x: f32[batch, 1], %i: i64[batch, 4]) {
  const %zeros: f32[4] = [0.0, 0.0, 0.0, 0.0]
  const %one: f32[] = 1.0
  const %two: f32[] = 2.0
  %0: f32[batch, 4] = add(%x, %zeros)
  %1: f32[batch, 4] = mul(%i, %one)
  %2: f32[batch, 3] = slice(%0) {axis=1, start=1}
  %3: f32[batch, 2] = slice(%1) {axis=1, end=4, step=2}
  %4: f16[batch, 4] = cast(%0) {dtype=f16}
  %5: f32[batch, 4] = mul(%1, %two)
  %6: f32[4, batch] = permute(%5) {perm=[1, 0]}
  return %2, %3, %4, %6
}"""
    graph, rec = apply(text, PASS)
    assert rec.status == "unchanged"
    assert_graph(graph, text)
    assert rec.rules["noop/add-zero"]["tried"] == 1 and rec.matched("noop/add-zero") == 0
    assert rec.matched("noop/mul-one") == 0 and rec.matched("noop/slice") == 0


def test_weights_that_happen_to_be_ones_are_kept():
    """A norm weight of all ones is still a weight (another checkpoint changes it)."""
    text = """
graph main(%x: f32[batch, 4]) {
  const %ln_weight: f32[4] = [1.0, 1.0, 1.0, 1.0]
  const %ln_bias: f32[4] = [0.0, 0.0, 0.0, 0.0]
  %0: f32[batch, 4] = mul(%x, %ln_weight)
  %1: f32[batch, 4] = add(%0, %ln_bias)
  return %1
}"""
    graph, rec = apply(text, PASS)
    assert rec.status == "unchanged"
    assert_graph(graph, text)


def test_training_dropout_is_kept():
    text = """
graph main(%x: f32[4]) {
  %0: f32[4] = dropout(%x) {p=0.5, train}
  return %0
}"""
    graph = parse_graph(text)
    log = run_passes(graph, [PASS])
    assert log[0].status == "unchanged" and graph.find("dropout")


def test_output_that_is_a_noop_forwards_the_input():
    graph, rec = apply("""
graph main(%x: f32[2, 3]) {
  %0: f32[2, 3] = identity(%x)
  return %0, %0
}""", PASS)
    assert graph.outputs == [graph.inputs[0], graph.inputs[0]]
    assert len(graph) == 0
