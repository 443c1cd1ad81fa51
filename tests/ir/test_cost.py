"""Cost model: per-node flops/bytes from the OpDefs, symbolic and evaluated graph totals."""

from __future__ import annotations

import pytest

from transfuse.errors import IRVerifyError
from transfuse.ir.cost import graph_cost, node_cost
from transfuse.ir.parser import parse_graph
from transfuse.ir.types import eval_dim, parse_dim

TEXT = """\
graph g(%x: f32[batch, seq, 16]) {
  const %w: f32[32, 16]
  %h: f32[batch, seq, 32] = linear(%x, %w, _)
  %q: f32[batch, seq, 4, 8] = reshape(%h) {shape=[batch, seq, 4, 8]}
  %a: f32[batch, seq, 4, 8] = attention(%q, %q, %q) {causal, layout="bshd"}
  %g: f32[batch, seq, 4, 8] = gelu(%a)
  %r: f32[batch, seq, 4, 8] = identity(%g)
  return %r
}
"""


def test_node_costs_are_symbolic():
    g = parse_graph(TEXT)
    lin, rs, att, gelu, ident = g.nodes
    flops, nbytes = node_cost(lin)
    assert flops == parse_dim("2*batch*seq*16*32")
    assert nbytes == parse_dim("4*(batch*seq*16 + 32*16 + batch*seq*32)")
    assert node_cost(rs)[0] == 0  # a view does no arithmetic
    assert node_cost(att)[0] == parse_dim("4*batch*4*seq*seq*8")
    assert node_cost(gelu)[0] == parse_dim("batch*seq*32")
    assert node_cost(ident) == (0, 0)


def test_graph_cost_totals_and_breakdown():
    g = parse_graph(TEXT)
    cost = graph_cost(g)
    assert cost["nodes"] == 5
    assert set(cost["by_op"]) == {"linear", "reshape", "attention", "gelu", "identity"}
    assert all(v["count"] == 1 for v in cost["by_op"].values())
    env = {"batch": 2, "seq": 64}
    total = sum(eval_dim(node_cost(n)[0], env) for n in g.nodes)
    assert eval_dim(cost["flops"], env) == total
    concrete = graph_cost(g, env)
    assert concrete["flops"] == total and isinstance(concrete["flops"], int)
    assert concrete["bytes"] == sum(eval_dim(node_cost(n)[1], env) for n in g.nodes)
    assert all(isinstance(v["flops"], int) for v in concrete["by_op"].values())
    # ordered by decreasing flops: attention (quadratic in seq) first at this size
    assert list(concrete["by_op"])[0] == "attention"
    assert concrete["by_op"]["attention"]["flops"] == 4 * 2 * 4 * 64 * 64 * 8


def test_static_graph_costs_are_ints_and_missing_symbol_raises():
    g = parse_graph(TEXT.replace("batch", "2").replace("seq", "3"))
    cost = graph_cost(g)
    assert isinstance(cost["flops"], int) and isinstance(cost["bytes"], int)
    with pytest.raises(IRVerifyError, match="no value bound"):
        graph_cost(parse_graph(TEXT), {"batch": 2})


def test_empty_graph():
    g = parse_graph("graph g(%x: f32[4]) {\n  return %x\n}\n")
    assert graph_cost(g) == {"flops": 0, "bytes": 0, "nodes": 0, "by_op": {}}
