import torch
from pass_helpers import apply, assert_graph

from transfuse.ir.graph import Graph
from transfuse.ir.types import DType, TensorType
from transfuse.passes.manager import run_passes

PASS = "cleanup.eliminate-common-subexpressions"


def test_merges_identical_nodes_and_constants():
    graph, rec = apply("""
graph main(%x: f32[batch, 4], %y: f32[batch, 4]) {
  const %a: f32[] = 2.0
  const %b: f32[] = 2.0
  %0: f32[batch, 4] = mul(%x, %a)
  %1: f32[batch, 4] = mul(%b, %x)
  %2: f32[batch, 2, 2] = reshape(%0) {shape=[batch, 2, 2]}
  %3: f32[batch, 2, 2] = reshape(%1) {shape=[batch, 2, 2]}
  %4: f32[batch, 2, 2] = add(%2, %3)
  %5: f32[batch, 4] = sub(%x, %y)
  %6: f32[batch, 4] = sub(%y, %x)
  return %4, %5, %6
}""", PASS)
    assert_graph(graph, """
graph main(%x: f32[batch, 4], %y: f32[batch, 4]) {
  const %a: f32[] = 2.0
  %0: f32[batch, 4] = mul(%x, %a)
  %2: f32[batch, 2, 2] = reshape(%0) {shape=[batch, 2, 2]}
  %4: f32[batch, 2, 2] = add(%2, %2)
  %5: f32[batch, 4] = sub(%x, %y)
  %6: f32[batch, 4] = sub(%y, %x)
  return %4, %5, %6
}""")
    assert rec.matched("cse/constant") == 1 and rec.matched("cse/node") == 2
    assert rec.op_delta == {"mul": -1, "reshape": -1}


def test_different_attrs_dtypes_and_impure_nodes_stay():
    text = """
graph main(%x: f32[4]) {
  const %a: f32[] = 2.0
  const %b: f64[] = 2.0
  const %c: f32[] = -0.0
  const %d: f32[] = 0.0
  %0: f32[4] = softmax(%x) {axis=0}
  %1: f32[4] = softmax(%x) {axis=-1}
  %2: f32[4] = mul(%x, %a)
  %3: f32[4] = mul(%x, %b)
  %4: f32[4] = add(%x, %c)
  %5: f32[4] = add(%x, %d)
  %6: f32[2] = slice(%x) {axis=0, end=2}
  %7: f32[2] = slice(%x) {axis=0, start=2}
  return %0, %1, %2, %3, %4, %5, %6, %7
}"""
    graph, rec = apply(text, PASS)
    assert rec.status == "unchanged"
    assert_graph(graph, text)
    assert rec.rules["cse/node"]["tried"] == 8


def test_training_dropout_is_never_merged():
    from transfuse.ir.parser import parse_graph

    graph = parse_graph("""
graph main(%x: f32[4]) {
  %0: f32[4] = dropout(%x) {p=0.5, train}
  %1: f32[4] = dropout(%x) {p=0.5, train}
  return %0, %1
}""")
    log = run_passes(graph, [PASS])
    assert log[0].status == "unchanged" and len(graph.find("dropout")) == 2


def test_tied_big_weights_merge_without_hashing():
    g = Graph()
    x = g.add_input("x", TensorType(DType.f32, [2, 128]))
    w = torch.randn(128, 128)
    a, b = g.add_constant(w, "wte"), g.add_constant(w, "lm_head")
    c = g.add_constant(w.clone(), "copy")  # equal values, other storage: too big to compare
    g.set_outputs([g.op("linear", x, a), g.op("linear", x, b), g.op("linear", x, c)])
    log = run_passes(g, [PASS])
    assert log[0].matched("cse/constant") == 1
    assert set(g.constants) == {"wte", "copy"}
    assert log[0].matched("cse/node") == 1 and len(g.find("linear")) == 2


def test_equal_weights_keep_their_names():
    """Two parameters with equal values (fresh norm weights) are not merged."""
    text = """
graph main(%x: f32[4]) {
  const %ln1_weight: f32[4] = [1.0, 1.0, 1.0, 1.0]
  const %ln2_weight: f32[4] = [1.0, 1.0, 1.0, 1.0]
  %0: f32[4] = mul(%x, %ln1_weight)
  %1: f32[4] = mul(%x, %ln2_weight)
  return %0, %1
}"""
    graph, rec = apply(text, PASS)
    assert rec.status == "unchanged"
    assert_graph(graph, text)
