from pass_helpers import apply, assert_graph

PASS = "cleanup.fold-views"


def test_folds_view_chains():
    graph, rec = apply("""
graph main(%x: f32[batch, seq, 8], %y: f32[batch, seq, 8]) {
  %0: f32[batch, seq, 2, 4] = reshape(%x) {shape=[batch, seq, 2, 4]}
  %1: f32[batch, 2, seq, 4] = permute(%0) {perm=[0, 2, 1, 3]}
  %2: f32[batch, 2, 4, seq] = permute(%1) {perm=[0, 1, 3, 2]}
  %3: f32[batch, seq, 1, 8] = reshape(%y) {shape=[batch, seq, 1, 8]}
  %4: f32[batch, seq, 8] = reshape(%3) {shape=[batch, seq, 8]}
  %5: f32[batch, 1, seq, 8] = permute(%3) {perm=[0, 2, 1, 3]}
  %6: f32[batch, seq, 8, 1] = reshape(%5) {shape=[batch, seq, 8, 1]}
  %7: f32[batch, 2, seq, 4] = permute(%1) {perm=[0, 1, 2, 3]}
  %8: f32[batch, seq, 2, 4] = permute(%1) {perm=[0, 2, 1, 3]}
  return %2, %4, %6, %7, %8
}""", PASS)
    assert_graph(graph, """
graph main(%x: f32[batch, seq, 8], %y: f32[batch, seq, 8]) {
  %0: f32[batch, seq, 2, 4] = reshape(%x) {shape=[batch, seq, 2, 4]}
  %2: f32[batch, 2, 4, seq] = permute(%0) {perm=[0, 2, 3, 1]}
  %6: f32[batch, seq, 8, 1] = reshape(%y) {shape=[batch, seq, 8, 1]}
  %7: f32[batch, 2, seq, 4] = permute(%0) {perm=[0, 2, 1, 3]}
  return %2, %y, %6, %7, %0
}""")
    assert rec.matched("views/permute-permute") == 3
    assert rec.matched("views/reshape-reshape") == 2
    assert rec.matched("views/permute-as-reshape") == 1
    origins = {n.meta.get("origin") for n in graph.nodes}
    assert "cleanup.fold-views/views/permute-permute" in origins


def test_expand_chain_and_non_view_neighbours():
    text = """
graph main(%x: f32[1, 8], %y: f32[4, 8]) {
  %0: f32[4, 8] = expand(%x) {shape=[4, 8]}
  %1: f32[2, 4, 8] = expand(%0) {shape=[2, 4, 8]}
  %2: f32[4, 8] = relu(%y)
  %3: f32[32] = reshape(%2) {shape=[32]}
  %4: f32[8, 4] = permute(%y) {perm=[1, 0]}
  return %1, %3, %4
}"""
    graph, rec = apply(text, PASS)
    assert_graph(graph, """
graph main(%x: f32[1, 8], %y: f32[4, 8]) {
  %1: f32[2, 4, 8] = expand(%x) {shape=[2, 4, 8]}
  %2: f32[4, 8] = relu(%y)
  %3: f32[32] = reshape(%2) {shape=[32]}
  %4: f32[8, 4] = permute(%y) {perm=[1, 0]}
  return %1, %3, %4
}""")
    assert rec.matched("views/expand-expand") == 1
    assert rec.rules["views/reshape-reshape"]["matched"] == 0
