"""Graph editing: use lists, erase, iteration while editing, insertion points, clone, networkx."""

from __future__ import annotations

import pytest
import torch

from transfuse.errors import IRVerifyError
from transfuse.ir.graph import Graph
from transfuse.ir.printer import print_graph
from transfuse.ir.types import DType, TensorType, sym
from transfuse.ir.verify import verify

S = sym("seq")
T = TensorType(DType.f32, [S, 4])


def chain() -> tuple[Graph, list]:
    """x -> neg -> exp -> add(., x) -> out, with a constant weight used by mul."""
    g = Graph("chain")
    x = g.add_input("x", T)
    w = g.add_constant(torch.ones(4), "w")
    a = g.op("neg", x, name="a")
    b = g.op("exp", a, name="b")
    c = g.op("add", b, x, name="c")
    d = g.op("mul", c, w, name="d")
    g.set_outputs([d])
    return g, [x, w, a, b, c, d]


def uses(v):
    return [(n.op, i) for n, i in v.uses]


def test_create_maintains_use_lists():
    g, (x, w, a, b, c, d) = chain()
    assert uses(x) == [("neg", 0), ("add", 1)]
    assert uses(a) == [("exp", 0)]
    assert uses(w) == [("mul", 1)]
    assert a.producer.op == "neg" and a.index == 0
    assert x.is_input and w.is_const and not a.is_input
    assert d.num_uses == 1 and c.num_uses == 1 and x.num_uses == 2
    assert [n.name for n in (a, b, c, d)] == ["a", "b", "c", "d"]
    assert x.users == [a.producer, c.producer]
    verify(g)


def test_set_input_and_replace_all_uses():
    g, (x, w, a, b, c, d) = chain()
    g.set_input(c.producer, 1, a)
    assert uses(x) == [("neg", 0)]
    assert uses(a) == [("exp", 0), ("add", 1)]
    assert c.producer.inputs[1] is a
    n = g.replace_all_uses(a, x)
    assert n == 2
    assert a.uses == []
    assert uses(x) == [("neg", 0), ("exp", 0), ("add", 1)]
    assert g.replace_all_uses(d, c) == 1  # graph outputs follow
    assert g.outputs == [c]
    assert g.replace_all_uses(c, c) == 0
    verify(g)


def test_erase_of_used_node_raises_and_unused_erases():
    g, (x, w, a, b, c, d) = chain()
    with pytest.raises(IRVerifyError, match="still used"):
        g.erase(a.producer)
    with pytest.raises(IRVerifyError, match="graph outputs"):
        g.erase(d.producer)
    g.replace_all_uses(d, c)
    g.erase(d.producer)
    assert uses(w) == [] and uses(c) == []
    assert g.remove_unused_constants() == 1 and "w" not in g.constants
    assert [n.op for n in g.nodes] == ["neg", "exp", "add"]
    assert len(g) == 3
    verify(g)


def test_iteration_while_erasing_is_safe():
    g, (x, w, a, b, c, d) = chain()
    g.set_input(c.producer, 0, x)  # a and b are now dead
    visited = []
    for node in g.nodes:
        visited.append(node.op)
        if node.op == "neg":
            g.erase(b.producer)  # the next node, erased before the iterator reaches it
            g.erase(node)  # and the current one
    assert visited == ["neg", "add", "mul"]
    assert [n.op for n in g.nodes] == ["add", "mul"]
    # dead-code sweep in reverse, erasing as we go
    g2, (x2, _, a2, b2, c2, d2) = chain()
    g2.set_input(c2.producer, 0, x2)
    for node in reversed(g2.nodes):
        if not any(v.num_uses for v in node.outputs):
            g2.erase(node)
    assert [n.op for n in g2.nodes] == ["add", "mul"]
    verify(g)
    verify(g2)


def test_iteration_while_inserting_is_safe():
    g, (x, w, a, b, c, d) = chain()
    visited = []
    for node in g.nodes:
        visited.append(node.op)
        if node.op == "exp":
            # insert after the current node: the iterator already holds the old next node
            r = g.create("relu", [node.output], after=node).output
            g.set_input(c.producer, 0, r)
    assert visited == ["neg", "exp", "add", "mul"]
    assert [n.op for n in g.nodes] == ["neg", "exp", "relu", "add", "mul"]
    verify(g)


def test_inserting_before_and_after():
    g, (x, w, a, b, c, d) = chain()
    with g.inserting_before(c.producer):
        s1 = g.op("sigmoid", b)
        s2 = g.op("tanh", s1)
    g.set_input(c.producer, 0, s2)
    assert [n.op for n in g.nodes] == ["neg", "exp", "sigmoid", "tanh", "add", "mul"]
    with g.inserting_after(a.producer):
        g.op("abs", a)
        g.op("relu", a)
    assert [n.op for n in g.nodes][:4] == ["neg", "abs", "relu", "exp"]
    g.op("sin", d)  # insertion point restored: appended at the end
    assert list(g.nodes)[-1].op == "sin"
    g.create("cos", [a], before=b.producer)
    assert [n.op for n in g.nodes][3:5] == ["cos", "exp"]
    verify(g)


def test_create_rejects_values_from_another_graph():
    g, _ = chain()
    other = Graph()
    y = other.add_input("y", T)
    with pytest.raises(IRVerifyError, match="another graph"):
        g.op("neg", y)


def test_clone_is_independent_and_prints_identically():
    g, (x, w, a, b, c, d) = chain()
    list(g.nodes)[0].meta["source"] = "block.0"
    text = print_graph(g)
    g2 = g.clone()
    assert print_graph(g2) == text
    verify(g2)
    # edit the clone
    n2 = {n.op: n for n in g2.nodes}
    r = g2.create("relu", [n2["add"].output], after=n2["add"]).output
    g2.set_input(n2["mul"], 0, r)
    n2["neg"].meta["source"] = "changed"
    n2["neg"].attrs["foo"] = 1
    assert print_graph(g) == text  # original unchanged
    assert uses(c) == [("mul", 0)]
    assert list(g.nodes)[0].meta["source"] == "block.0"
    assert "foo" not in list(g.nodes)[0].attrs
    # constants shared unless asked; fresh names stay unique in the clone
    assert g2.constants["w"].const is w.const
    assert g.clone(share_constants=False).constants["w"].const is not w.const
    assert g2.fresh_name("a") != "a"


def test_to_networkx_nodes_and_edges():
    g, (x, w, a, b, c, d) = chain()
    dg = g.to_networkx()
    kinds = {k: v["kind"] for k, v in dg.nodes(data=True)}
    assert sorted(kinds.values()) == ["const", "input", "node", "node", "node", "node", "output"]
    edges = {(u, v, e["value"]) for u, v, e in dg.edges(data=True)}
    assert edges == {
        ("input:x", "node:0:neg", "x"),
        ("node:0:neg", "node:1:exp", "a"),
        ("node:1:exp", "node:2:add", "b"),
        ("input:x", "node:2:add", "x"),
        ("node:2:add", "node:3:mul", "c"),
        ("const:w", "node:3:mul", "w"),
        ("node:3:mul", "output:0", "d"),
    }
    import networkx as nx

    assert nx.is_directed_acyclic_graph(dg)


def test_fresh_names_are_sanitised_and_unique():
    g = Graph()
    assert g.fresh_name("h.0.attn") == "h_0_attn"
    assert g.fresh_name("h.0.attn") != "h_0_attn"
    n = g.fresh_name()
    assert n.isdigit() and g.fresh_name() != n
    v = g.add_constant(torch.zeros(2), "1.weight")
    assert all(ch.isalnum() or ch == "_" for ch in v.name)


def test_histogram_find_and_multi_output():
    g = Graph()
    x = g.add_input("x", TensorType(DType.f32, [S, 6]))
    node = g.create("split", [x], {"axis": 1, "sizes": [2, 4]})
    assert [str(v.type) for v in node.outputs] == ["f32[seq, 2]", "f32[seq, 4]"]
    with pytest.raises(IRVerifyError, match="2 outputs"):
        node.output  # noqa: B018
    g.set_outputs(list(node.outputs))
    assert g.op_histogram() == {"split": 1}
    assert g.find("split") == [node]
    assert g.symbols() == {"seq"}


def test_is_erased_follows_erase_and_move():
    g, (x, w, a, b, c, d) = chain()
    node_b, node_c = b.producer, c.producer
    assert not node_b.is_erased
    g.replace_all_uses(b, a)
    g.erase(node_b)
    assert node_b.is_erased and node_b not in list(g.nodes)
    g.move_before(node_c, a.producer)  # a moved node is live again, not erased
    assert not node_c.is_erased


def test_restore_rolls_back_in_place_and_keeps_names_reserved():
    g, (x, w, a, b, c, d) = chain()
    class Listener:
        def on_create(self, node):
            pass

        def on_erase(self, node):
            pass

    listener = Listener()
    g.listeners.append(listener)
    snapshot = g.clone()
    before = print_graph(g)
    g.replace_all_uses(d, c)
    g.erase(d.producer)
    late = g.op("relu", c, name="late")  # a name handed out after the snapshot
    g.set_outputs([late])
    assert print_graph(g) != before
    g.restore(snapshot)
    assert print_graph(g) == before and print_graph(snapshot) == before
    assert g.listeners == [listener]
    assert all(v.graph is g for v in g.values()) and all(n.graph is g for n in g.nodes)
    verify(g)
    again = g.op("relu", g.outputs[0], name="late")
    assert again.name != "late"  # still reserved: a caller may hold the old value
    g.restore(snapshot)  # the snapshot stays usable for a second rollback
    assert print_graph(g) == before


def test_exact_names_and_rename_values():
    g = Graph()
    x = g.add_input("7", T, exact=True)
    assert x.name == "7"  # fresh names would refuse a leading digit
    with pytest.raises(IRVerifyError, match="already in use"):
        g.add_input("7", T, exact=True)
    w = g.add_constant(torch.ones(4), "w", exact=True)
    with pytest.raises(IRVerifyError, match="already in use"):
        g.add_constant(torch.ones(4), "w", exact=True)
    a, b = g.op("neg", x), g.op("exp", x)
    g.rename_values([a, b], [b.name, a.name])  # a swap is fine: renamed all at once
    g.rename_values([w], ["weight"])
    assert list(g.constants) == ["weight"] and g.constants["weight"] is w
    w2 = g.add_constant(torch.zeros(4), "w2", exact=True)
    g.rename_values([w, w2], ["w2", "weight"])  # constants swap names too
    assert g.constants == {"w2": w, "weight": w2}
    with pytest.raises(IRVerifyError, match="%7 already in use"):
        g.rename_values([a], ["7"])
    assert a.name != "7"  # nothing renamed on error
    assert g.fresh_name("w") == "w"  # the old constant name was released
