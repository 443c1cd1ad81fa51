from pass_helpers import apply, assert_graph

PASS = "cleanup.eliminate-dead-code"


def test_removes_dead_chains_and_unused_constants():
    graph, rec = apply("""
graph main(%x: f32[batch, 4]) {
  const %w: f32[4, 4]
  const %unused: f32[8]
  %0: f32[batch, 4] = linear(%x, %w)
  %1: f32[batch, 4] = exp(%0)
  %2: f32[batch, 4] = tanh(%1)
  %3: f32[batch, 4] = relu(%x)
  return %3
}""", PASS)
    assert_graph(graph, """
graph main(%x: f32[batch, 4]) {
  %3: f32[batch, 4] = relu(%x)
  return %3
}""")
    assert rec.matched("dce/node") == 3 and rec.matched("dce/constant") == 2
    assert rec.op_delta == {"exp": -1, "linear": -1, "tanh": -1}
    assert [e.matched[0].op for e in rec.events] == ["tanh", "exp", "linear"]


def test_keeps_impure_and_used_nodes_and_inputs():
    text = """
graph main(%x: f32[4], %unused_input: f32[4]) {
  const %ok: bool[] = true
  %0: f32[4] = dropout(%x) {p=0.5, train}
  assert(%ok) {message="kept"}
  %1: f32[4] = relu(%x)
  return %1
}"""
    from transfuse.ir.parser import parse_graph
    from transfuse.passes.manager import run_passes

    graph = parse_graph(text)
    log = run_passes(graph, [PASS])
    assert log[0].status == "unchanged"
    assert [n.op for n in graph.nodes] == ["dropout", "assert", "relu"]
    assert len(graph.inputs) == 2 and "ok" in graph.constants


def test_noop_then_dce_removes_assert_inputs():
    graph, rec = apply("""
graph main(%x: f32[4]) {
  const %z: f32[] = 0.0
  %0: bool[4] = ge(%x, %x)
  assert(%0) {message="x is not nan"}
  %1: f32[4] = relu(%x)
  return %1
}""", "cleanup.remove-noops", PASS)
    assert [n.op for n in graph.nodes] == ["relu"] and not graph.constants
    assert rec.matched("dce/node") == 1
