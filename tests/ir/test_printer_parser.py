"""Text form: printing, parsing, exact round trips and parse errors with line numbers."""

from __future__ import annotations

import time

import pytest
import torch

from transfuse.errors import ParseError
from transfuse.ir.graph import Graph
from transfuse.ir.parser import parse_graph, random_constant
from transfuse.ir.printer import print_graph, print_graph_context, print_node
from transfuse.ir.types import DType, TensorType, sym
from transfuse.ir.verify import verify

F32, I64 = DType.f32, DType.i64
B, S = sym("batch"), sym("seq")

CONTRACT_EXAMPLE = """\
graph main(%x: f32[batch, seq, 64], %ids: i64[batch, seq]) {
  const %w: f32[32, 64]
  const %half: f32[] = 0.5
  %0: f32[batch, seq, 32] = linear(%x, %w, _)  # uses=1 @h.0.attn.q <- cleanup.fold-views
  %1: f32[batch, seq, 16], %2: f32[batch, seq, 16] = split(%0) {axis=-1, sizes=[16, 16]}  # uses=1,1
  return %1, %2
}
"""


def roundtrip(g: Graph) -> str:
    text = print_graph(g)
    g2 = parse_graph(text, {n: v.const for n, v in g.constants.items()})
    assert print_graph(g2) == text
    verify(g2)
    return text


def test_contract_example_parses_verifies_and_prints_back():
    g = parse_graph(CONTRACT_EXAMPLE)
    verify(g)
    assert print_graph(g) == CONTRACT_EXAMPLE
    linear = g.find("linear")[0]
    assert linear.inputs[2] is None
    assert linear.meta == {"source": "h.0.attn.q", "origin": "cleanup.fold-views"}
    assert [v.name for v in g.outputs] == ["1", "2"]
    assert g.constants["half"].const.item() == 0.5
    assert g.constants["w"].const.shape == (32, 64)


def _every_attr_kind_graph() -> Graph:
    g = Graph("every_kind")
    x = g.add_input("x", TensorType(F32, [B, S, 4, 8]))
    ids = g.add_input("ids", TensorType(I64, [B, S]))
    kpm = g.add_input("kpm", TensorType(DType.bool, [B, S]))
    emb = g.add_constant(torch.randn(10, 8), "emb")
    g.add_constant(torch.tensor([[True, False], [False, True]]), "tiny_mask")
    g.add_constant(torch.tensor(0.1, dtype=torch.float32), "c")
    g.add_constant(torch.tensor([1.5, -2.0, float("inf")], dtype=torch.float16), "h")
    g.add_constant(torch.tensor([3, -4], dtype=torch.int32), "i")
    g.add_constant(torch.tensor(1 / 3, dtype=torch.bfloat16), "bf")
    g.add_constant(torch.tensor(1 / 3, dtype=torch.float64), "d")
    e = g.op("embedding", emb, ids)  # no attrs
    e = g.op("cast", e, dtype=DType.f16)  # dtype
    e = g.op("clamp", e, min=-1.5, max=None)  # float?, none
    a = g.op(
        "attention",
        x,
        x,
        x,
        None,
        kpm,
        causal=True,
        window=3,  # bool, int?, floats?, str
        alibi=[0.5, 0.25, 0.125, 0.0625],
        softcap=30.0,
        scale=1e-05,
        layout="bshd",
    )
    r = g.op("reshape", a, shape=[B, S, 32])  # dims (symbolic)
    s = g.create("split", [r], {"axis": -1, "sizes": [8, 24]}).outputs  # multi-output
    t = g.op("slice", s[1], axis=1, start=1, end=S + 1 - 1, step=2)  # dim attrs
    r2 = g.op("reduce_sum", t, axes=[0, -1], keepdim=True)  # ints
    ar = g.op("arange", end=2 * S + 1, dtype=DType.f32)  # symbolic expression
    fb = g.create(
        "torch_fallback",
        [r2],
        {"target": "aten::cumprod.default", "args": '{"args": [{"$in": 0}, 1]}'},
        out_types=[r2.type],
        meta={"source": "model.weird # op", "origin": "frontend"},
    )
    gl = g.op("gelu", e, approximate="tanh")
    g.create("assert", [kpm], {"message": 'quote " and \\ and\nnewline'})  # zero outputs
    g.set_outputs([s[0], fb.output, ar, gl, s[0]])
    return g


def test_roundtrip_covers_every_attr_kind():
    g = _every_attr_kind_graph()
    verify(g)
    text = roundtrip(g)
    # attrs in OpDef order, defaults left out, a true bool bare
    assert (
        "{scale=1e-05, causal, window=3, alibi=[0.5, 0.25, 0.125, 0.0625], softcap=30.0, "
        'layout="bshd"}'
    ) in text
    assert "shape=[batch, seq, 32]" in text
    assert "end=2*seq+1" in text and "f32[2*seq+1]" in text
    assert "min=-1.5" in text and "max=" not in text  # default none not printed
    assert "uses=2,1" in text  # split: output 0 used twice as a graph output
    assert "attention(%x, %x, %x, _, %kpm)" in text
    assert "# @model.weird # op <- frontend" in text.replace("uses=1 ", "")
    assert "const %c: f32[] = 0.1" in text
    assert "const %h: f16[3] = [1.5, -2.0, inf]" in text
    assert "assert(%kpm) {message=" in text


def test_roundtrip_keeps_values_and_meta_exactly():
    g = _every_attr_kind_graph()
    g2 = parse_graph(print_graph(g), {n: v.const for n, v in g.constants.items()})
    for name in ("c", "h", "i", "bf", "d", "tiny_mask"):
        a, b = g.constants[name].const, g2.constants[name].const
        assert a.dtype == b.dtype and torch.equal(a, b), name
    n1, n2 = g.find("attention")[0], g2.find("attention")[0]
    assert n1.attrs == n2.attrs
    assert g2.find("assert")[0].attrs["message"] == 'quote " and \\ and\nnewline'
    fb = g2.find("torch_fallback")[0]
    assert fb.meta == {"source": "model.weird # op", "origin": "frontend"}


def test_value_names_roundtrip_digits_and_reused_numbers():
    text = """\
graph g(%0: f32[4]) {
  %2: f32[2], %1: f32[2] = split(%0) {axis=0, sizes=[2, 2]}
  %3: f32[4] = concat(%1, %2) {axis=0}
  %x_1: f32[4] = neg(%3)
  return %x_1
}
"""
    g = parse_graph(text)
    verify(g)
    text_out = print_graph(g)
    assert "%2: f32[2], %1: f32[2] = split(%0)" in text_out
    v = g.op("neg", g.outputs[0])  # fresh names never collide with parsed ones
    assert v.name not in {"0", "1", "2", "3", "x_1"}


def test_print_node_and_context():
    g = parse_graph(CONTRACT_EXAMPLE)
    lin = g.find("linear")[0]
    assert print_node(lin) == (
        "%0: f32[batch, seq, 32] = linear(%x, %w, _)  # uses=1 @h.0.attn.q <- cleanup.fold-views"
    )
    x = g.inputs[0]
    for _ in range(10):
        x = g.op("neg", x)
    mid = list(g.nodes)[6]
    ctx = print_graph_context(g, mid, radius=2)
    lines = ctx.splitlines()
    assert lines[0].startswith("   ... (4 nodes before)")
    assert sum(line.startswith(">> ") for line in lines) == 1
    assert lines[3] == ">> " + print_node(mid)
    assert lines[-1] == "   ... (3 nodes after)"


def test_symbolic_dims_and_expressions_parse():
    text = """\
graph main(%x: f32[batch, seq]) {
  %0: f32[batch, seq+1] = concat(%x, %x1) {axis=1}
  return %0
}
"""
    with pytest.raises(ParseError, match="line 2: value %x1 is not defined"):
        parse_graph(text)
    text = text.replace("%x1", "%c").replace("{\n", "{\n  const %c: f32[1, 1] = [[2.0]]\n", 1)
    # f32[1, 1] does not broadcast to batch: parse is fine, verify catches the declared type
    g = parse_graph(text)
    assert str(g.outputs[0].type) == "f32[batch, seq+1]"


def test_random_constants_are_deterministic():
    t = TensorType(F32, [3, 4])
    assert torch.equal(random_constant("w", t), random_constant("w", t))
    assert not torch.equal(random_constant("w", t), random_constant("v", t))
    ids = random_constant("ids", TensorType(I64, [16]))
    assert ids.dtype == torch.int64 and ids.min() >= 0
    g1 = parse_graph("graph g() {\n  const %w: f32[2, 3]\n  return %w\n}\n")
    g2 = parse_graph("graph g() {\n  const %w: f32[2, 3]\n  return %w\n}\n")
    assert torch.equal(g1.constants["w"].const, g2.constants["w"].const)


def test_constants_from_mapping():
    text = "graph g() {\n  const %w: f32[2, 3]\n  return %w\n}\n"
    w = torch.ones(2, 3)
    assert parse_graph(text, {"w": w}).constants["w"].const is w
    with pytest.raises(ParseError, match=r"line 2: .*%w .*not in the given constants"):
        parse_graph(text, {})
    with pytest.raises(ParseError, match=r"line 2: .*declared f32\[2, 3\] but its payload is"):
        parse_graph(text, {"w": torch.ones(3, 2)})


BAD = [
    # (text, line, message regex)
    ("graph g(%x: f33[4]) {\n  return %x\n}\n", 1, "unknown dtype 'f33'"),
    ("graph g(%x: f32[4) {\n  return %x\n}\n", 1, "type"),
    (
        "graph g(%x: f32[4]) {\n  %0: f32[4] = frobnicate(%x)\n  return %0\n}\n",
        2,
        "unknown op 'frobnicate'",
    ),
    ("graph g(%x: f32[4]) {\n  %0: f32[4] = neg(%y)\n  return %0\n}\n", 2, "%y is not defined"),
    (
        "graph g(%x: f32[4]) {\n  %0: f32[4] = neg(%x)\n  %0: f32[4] = neg(%x)\n  return %0\n}\n",
        3,
        "%0 is defined twice",
    ),
    ("graph g(%x: f32[4], %x: f32[4]) {\n  return %x\n}\n", 1, "%x is defined twice"),
    (
        "graph g(%x: f32[4]) {\n  %0: f32[4] = softmax(%x) {dim=1}\n  return %0\n}\n",
        2,
        "softmax has no attribute 'dim'",
    ),
    (
        "graph g(%x: f32[4]) {\n  %0: f32[4] = softmax(%x) {axis=1.5}\n  return %0\n}\n",
        2,
        "attribute 'axis' of softmax: expected an integer",
    ),
    (
        "graph g(%x: f32[4]) {\n  %0: f32[4] = softmax(%x) {axis}\n  return %0\n}\n",
        2,
        "needs a value",
    ),
    (
        "graph g(%x: f32[4]) {\n  %0: f32[4] = cast(%x) {dtype=f99}\n  return %0\n}\n",
        2,
        "unknown dtype",
    ),
    (
        "graph g(%x: f32[4]) {\n  %0: f32[4] = cast(%x)\n  return %0\n}\n",
        2,
        "requires attribute 'dtype'",
    ),
    (
        "graph g(%x: f32[4]) {\n  %0: f32[4] = gelu(%x) {approximate=tanh}\n  return %0\n}\n",
        2,
        "expected a quoted string",
    ),
    ("graph g(%x: f32[4]) {\n  %0: f32[4] = neg(%x)\n  return %0\n", 3, "expected '}'"),
    ("graph g(%x: f32[4]) {\n  %0: f32[4] = neg(%x)\n}\n", 3, "missing 'return'"),
    ("graph g(%x: f32[4]) {\n  %0: f32[4] = neg(%x) junk\n  return %0\n}\n", 2, "expected '#'"),
    (
        "graph g() {\n  const %c: f32[2] = [1.0, 2.0, 3.0]\n  return %c\n}\n",
        2,
        r"inline value has shape \[3\]",
    ),
    ("graph g() {\n  const %c: f32[batch] = 1.0\n  return %c\n}\n", 2, "static"),
    ("graph g() {\n  const %c: i64[] = 1.5\n  return %c\n}\n", 2, "integers"),
    ("graph g(%x: f32[4]) {\n  return %x\n}\n}\n", 4, "after the end"),
    ("graph g(%x: f32[4]) {\n  return %x, %q\n}\n", 2, "%q is not defined"),
    ("graph g(%x: f32[4 +]) {\n  return %x\n}\n", 1, "cannot parse dimension"),
]


@pytest.mark.parametrize("text,line,message", BAD)
def test_parse_errors_name_the_line(text, line, message):
    with pytest.raises(ParseError, match=message) as info:
        parse_graph(text)
    assert str(info.value).startswith(f"line {line}:")


def test_parser_never_evaluates_code():
    # an attribute or dim that would run code if eval-ed is just a parse error
    evil = "__import__('os').system('echo pwned')"
    with pytest.raises(ParseError):
        parse_graph(f"graph g(%x: f32[{evil}]) {{\n  return %x\n}}\n")
    with pytest.raises(ParseError):
        parse_graph(
            "graph g(%x: f32[4]) {\n  %0: f32[4] = reshape(%x) "
            f"{{shape=[{evil}]}}\n  return %0\n}}\n"
        )


def test_blank_and_comment_lines_are_skipped():
    text = "# a graph\n\ngraph g(%x: f32[4]) {\n\n  # note\n  return %x\n}\n"
    g = parse_graph(text)
    assert print_graph(g) == "graph g(%x: f32[4]) {\n  return %x\n}\n"


def _big_graph(layers: int = 12, per_layer: int = 16) -> Graph:
    g = Graph("big")
    h = g.add_input("x", TensorType(F32, [B, S, 64]))
    for i in range(layers):
        w = g.add_constant(torch.randn(192, 64), f"h.{i}.attn.c_attn.weight")
        for _ in range(per_layer // 8):
            n = g.create("layer_norm", [h], {}, meta={"source": f"h.{i}.ln_1"})
            qkv = g.op("linear", n.output, w, None)
            q, k, v = g.create("split", [qkv], {"axis": -1, "sizes": [64, 64, 64]}).outputs
            q4 = g.op("reshape", q, shape=[B, S, 4, 16])
            k4 = g.op("reshape", k, shape=[B, S, 4, 16])
            a = g.op("attention", q4, k4, k4, causal=True, layout="bshd")
            h = g.op("add", h, g.op("reshape", a, shape=[B, S, 64]))
    g.set_outputs([h])
    return g


def test_printing_a_gpt2_sized_graph_is_fast():
    g = _big_graph(layers=12, per_layer=128)  # ~1500 nodes
    assert len(g) >= 1500
    print_graph(g)  # warm caches
    start = time.perf_counter()
    text = print_graph(g)
    elapsed = time.perf_counter() - start
    assert elapsed < 0.1, f"printing {len(g)} nodes took {elapsed * 1000:.0f} ms"
    g2 = parse_graph(text, {n: v.const for n, v in g.constants.items()})
    assert print_graph(g2) == text
