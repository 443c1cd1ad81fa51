import torch
from pass_helpers import apply, assert_graph

from transfuse.ir.limits import tensor_limit
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


HUGE_RANGE = """
graph main(%x: i64[4]) {
  %0: i64[2147483648] = arange() {end=2147483648}
  %1: i64[4] = slice(%0) {axis=0, start=0, end=4}
  %2: i64[4] = add(%x, %1)
  return %2
}"""


def test_a_16_gib_range_is_never_materialised(monkeypatch):
    allocations = []
    real_arange = torch.arange

    def spy(start, end, *args, **kw):  # records every call; never really allocates 16 GiB
        allocations.append((start, end))
        if end - start > 1 << 20:
            raise MemoryError(f"the test refuses to allocate arange({start}, {end})")
        return real_arange(start, end, *args, **kw)

    monkeypatch.setattr(torch, "arange", spy)
    for options in (None, {PASS: {"max_elements": 1 << 40}}):  # even with a huge element limit
        graph = parse_graph(HUGE_RANGE)
        rec = run_passes(graph, [PASS], verify=True, options=options)[0]
        assert rec.status == "unchanged" and graph.find("arange")
        (miss,) = rec.near_misses
        assert miss.node.op == "arange" and miss.node.outputs == "%0"
        assert "17179869184 bytes (16.0 GiB)" in miss.reason
        if options:
            assert "not materialised" in miss.reason and "above the limit" in miss.reason
    assert not allocations
    # the spy sees what folding does allocate: a small range is folded through torch.arange
    graph = parse_graph(HUGE_RANGE.replace("2147483648", "8"))
    assert run_passes(graph, [PASS])[0].matched("fold/constant") == 2  # arange, slice
    assert len(allocations) == 1


def test_the_byte_limit_is_the_ir_s_and_applies_before_the_element_limit():
    text = """
graph main(%x: i64[8]) {
  %0: i64[8] = arange() {end=8}
  %1: i64[8] = add(%x, %0)
  %2: i64[9] = arange() {end=9}
  return %1, %2
}"""
    with tensor_limit(64):  # 8 int64 fold, 9 do not
        graph, rec = apply(text, PASS)
    assert rec.matched("fold/constant") == 1 and [n.op for n in graph.nodes] == ["add", "arange"]
    (miss,) = rec.near_misses
    assert miss.reason.startswith("output %2 i64[9] not materialised: ")
    assert "72 bytes" in miss.reason and "limit of 64 bytes" in miss.reason
