"""verify(): every broken invariant raises IRVerifyError with the node and its context."""

from __future__ import annotations

import pytest
import torch

from transfuse.errors import IRVerifyError
from transfuse.ir.graph import Graph, Node
from transfuse.ir.parser import parse_graph
from transfuse.ir.types import DType, TensorType, sym
from transfuse.ir.verify import verify

S = sym("seq")


def g_text(body: str, params: str = "%x: f32[seq, 8]") -> str:
    return f"graph g({params}) {{\n{body}\n}}\n"


def fails(graph: Graph, message: str) -> str:
    with pytest.raises(IRVerifyError, match=message) as info:
        verify(graph)
    return str(info.value)


def test_valid_graph_passes():
    g = parse_graph(g_text("  %0: f32[seq, 8] = neg(%x)\n  return %0"))
    verify(g)


def test_wrong_declared_type_shows_context():
    text = g_text(
        "  %0: f32[seq, 8] = neg(%x)\n"
        "  %1: f32[seq, 8] = exp(%0)  # @block.1\n"
        "  %2: f16[seq, 8] = relu(%1)\n"
        "  %3: f32[seq, 8] = abs(%2)\n"
        "  return %3"
    )
    msg = fails(parse_graph(text), r"output types \[f16\[seq, 8\]\] differ from inferred")
    assert ">> %2: f16[seq, 8] = relu(%1)" in msg  # the node, marked
    assert "%1: f32[seq, 8] = exp(%0)" in msg  # and the lines around it
    assert "%3: f32[seq, 8] = abs(%2)" in msg


def test_wrong_declared_shape_symbolic():
    text = g_text("  %0: f32[seq+1, 8] = neg(%x)\n  return %0")
    fails(parse_graph(text), "differ from inferred")


def test_use_before_def():
    g = parse_graph(g_text("  %0: f32[seq, 8] = neg(%x)\n  %1: f32[seq, 8] = exp(%0)\n  return %1"))
    exp = g.find("exp")[0]
    neg = g.find("neg")[0]
    g.move_before(exp, neg)
    msg = fails(g, "used before it is defined")
    assert ">> %1: f32[seq, 8] = exp(%0)" in msg


def test_bad_attr_value():
    g = parse_graph(g_text("  %0: f32[seq, 8] = softmax(%x)\n  return %0"))
    g.find("softmax")[0].attrs["axis"] = "last"
    fails(g, "expected int")


def test_unknown_attr():
    g = parse_graph(g_text("  %0: f32[seq, 8] = softmax(%x)\n  return %0"))
    g.find("softmax")[0].attrs["dim"] = 1
    fails(g, "unknown attribute")


def test_reshape_changing_numel():
    text = g_text("  %0: f32[seq, 4] = reshape(%x) {shape=[seq, 4]}\n  return %0")
    msg = fails(parse_graph(text), "reshape changes the element count")
    assert ">> %0: f32[seq, 4] = reshape(%x)" in msg


def test_attention_heads_not_divisible():
    params = "%q: f32[1, 6, seq, 8], %k: f32[1, 4, seq, 8]"
    text = g_text("  %0: f32[1, 6, seq, 8] = attention(%q, %k, %k)\n  return %0", params)
    fails(parse_graph(text), "heads 6 not a multiple of kv heads 4")


def test_attention_kv_heads_attr_mismatch():
    params = "%q: f32[1, 4, seq, 8], %k: f32[1, 2, seq, 8]"
    text = g_text(
        "  %0: f32[1, 4, seq, 8] = attention(%q, %k, %k) {kv_heads=1}\n  return %0", params
    )
    fails(parse_graph(text), "kv_heads=1 but k has 2 heads")


def test_gelu_bad_approximate():
    text = g_text('  %0: f32[seq, 8] = gelu(%x) {approximate="fast"}\n  return %0')
    fails(parse_graph(text), "gelu approximate must be")


def test_where_condition_not_bool():
    text = g_text("  %0: f32[seq, 8] = where(%x, %x, %x)\n  return %0")
    fails(parse_graph(text), "where condition must be bool")


def test_missing_required_input_and_arity():
    g = parse_graph(g_text("  %0: f32[seq, 8] = neg(%x)\n  return %0"))
    neg = g.find("neg")[0]
    g.set_input(neg, 0, None)
    fails(g, "required but missing")
    g2 = parse_graph(g_text("  %0: f32[seq, 8] = add(%x)\n  return %0"))
    fails(g2, "add takes 2..2 inputs, got 1")


def test_stale_use_list():
    g = parse_graph(g_text("  %0: f32[seq, 8] = neg(%x)\n  return %0"))
    g.inputs[0].uses.clear()  # broken by hand, not through the Graph API
    fails(g, "use list of %x misses")


def test_duplicate_value_names():
    g = parse_graph(g_text("  %0: f32[seq, 8] = neg(%x)\n  return %0"))
    g.find("neg")[0].outputs[0].name = "x"
    fails(g, "defined twice")


def test_output_not_defined():
    g = parse_graph(g_text("  %0: f32[seq, 8] = neg(%x)\n  return %0"))
    other = Graph()
    g.outputs.append(other.add_input("y", TensorType(DType.f32, [1])))
    fails(g, "graph output 1 %y is not defined")


def test_constant_without_payload():
    g = parse_graph(g_text("  const %c: f32[8]\n  %0: f32[seq, 8] = add(%x, %c)\n  return %0"))
    g.constants["c"].const = None
    fails(g, "constant %c has no payload")


def test_node_from_another_graph():
    g = parse_graph(g_text("  %0: f32[seq, 8] = neg(%x)\n  return %0"))
    node = g.find("neg")[0]
    node.graph = Graph()
    fails(g, "another graph")


def test_unknown_op_in_graph():
    g = parse_graph(g_text("  %0: f32[seq, 8] = neg(%x)\n  return %0"))
    g.find("neg")[0].op = "frobnicate"
    fails(g, "unknown IR op 'frobnicate'")


def test_error_names_user_source():
    text = g_text("  %0: f32[seq, 4] = reshape(%x) {shape=[seq, 4]}  # @h.3.attn\n  return %0")
    msg = fails(parse_graph(text), "reshape")
    assert "(from h.3.attn)" in msg


def test_context_for_node_not_in_graph():
    g = parse_graph(g_text("  %0: f32[seq, 8] = neg(%x)\n  return %0"))
    stray = Node(g, "neg", {})
    stray.inputs = (g.inputs[0],)
    from transfuse.ir.printer import print_graph_context

    assert "not in the graph" in print_graph_context(g, stray)


def test_constant_types_are_checked_by_use():
    g = Graph()
    x = g.add_input("x", TensorType(DType.f32, [S, 8]))
    c = g.add_constant(torch.ones(8, dtype=torch.float16), "c")
    y = g.op("add", x, c)
    g.set_outputs([y])
    verify(g)
    assert y.type == TensorType(DType.f32, [S, 8])
