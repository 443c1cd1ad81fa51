"""convert.sparse-attention: causal attention -> sliding-window or block-sparse, error reported."""

import math

import pytest
import torch
from pass_helpers import assert_graph, sample_inputs

from transfuse.errors import PassError
from transfuse.ir.interpret import interpret
from transfuse.ir.opdefs.nn import attention as attention_ref
from transfuse.ir.parser import parse_graph
from transfuse.ir.verify import verify
from transfuse.passes.convert.sparse import BlockPattern, WindowPattern, keep_mask, parse_pattern
from transfuse.passes.manager import run_passes

PASS = "convert.sparse-attention"

# S queries after a prefix: T = ctx keys (bottom-right aligned causal)
CAUSAL = """
graph main(%q: f32[batch, 2, seq, 8], %k: f32[batch, 2, ctx, 8], %v: f32[batch, 2, ctx, 8]) {
  %o: f32[batch, 2, seq, 8] = attention(%q, %k, %v) {causal}  # @h.0.attn
  return %o
}"""
ENV = {"seq": 11, "ctx": 14}


def convert(text, **options):
    graph = parse_graph(text)
    inputs = sample_inputs(graph, ENV)
    before = interpret(graph, inputs)
    log = run_passes(graph, [PASS], options={"sample_inputs": inputs, **options})
    verify(graph)
    return graph, log.records[0], inputs, before


def reference(inputs, keep, causal=True, bias=None):
    """The attention reference op with an explicit mask of kept pairs."""
    mask = torch.zeros(keep.shape).masked_fill(~keep, -math.inf)
    if bias is not None:
        mask = mask + bias
    attrs = {"scale": None, "causal": causal, "window": None, "alibi": None, "softcap": None,
             "layout": "bhsd"}
    return attention_ref([*inputs[:3], mask], attrs, {})


def test_sliding_window_sets_the_window():
    graph, rec, inputs, before = convert(CAUSAL, sparse_attention="window:4")
    assert_graph(graph, CAUSAL.replace("{causal}", "{causal, window=4}"))
    assert rec.matched("convert/sliding-window") == 1
    (err,) = graph.meta["conversion_errors"]
    assert err["conversion"] == "sparse" and err["extra"]["pattern"] == "window:4"
    assert err["max_abs"] > 0
    out = interpret(graph, inputs)[0]
    torch.testing.assert_close(out, reference(inputs, keep_mask(WindowPattern(4), 11, 14)))


def test_block_sparse_builds_the_mask_in_the_graph():
    graph, rec, inputs, before = convert(CAUSAL, sparse_attention="block:4,local:2,global:1")
    assert rec.matched("convert/block-sparse") == 1
    (attn,) = graph.find("attention")
    assert attn.attrs["causal"] and attn.attrs["window"] is None
    bias = attn.inputs[3]
    assert str(bias.type) == "f32[seq, ctx]"  # symbolic: works for any length
    assert {n.op for n in graph.nodes} >= {"arange", "floor_div", "logical_or", "where"}
    assert bias.producer.meta["origin"] == f"{PASS}/convert/block-sparse"
    pattern = BlockPattern(4, 2, 1)
    for env in (ENV, {"seq": 7, "ctx": 7}, {"seq": 1, "ctx": 30}):
        inputs = sample_inputs(graph, env)
        out = interpret(graph, inputs)[0]
        expect = reference(inputs, keep_mask(pattern, env["seq"], env["ctx"]))
        torch.testing.assert_close(out, expect)
    note = next(n for n in rec.notes if n.startswith("sparse:"))
    assert "block:4,local:2,global:1" in note and "causal pairs kept" in note


def test_block_sparse_adds_to_an_existing_bias_and_shares_one_mask():
    text = """
graph main(%q: f32[batch, 2, seq, 8], %k: f32[batch, 2, seq, 8], %v: f32[batch, 2, seq, 8], %b: f32[batch, 1, 1, seq]) {
  %o1: f32[batch, 2, seq, 8] = attention(%q, %k, %v, %b) {causal}
  %o2: f32[batch, 2, seq, 8] = attention(%o1, %k, %v) {causal}
  return %o2
}"""
    graph, rec, inputs, _ = convert(text, sparse_attention="block:2,local:1")
    assert rec.matched("convert/block-sparse") == 2
    assert len(graph.find("where")) == 1 and len(graph.find("add")) == 1
    a1, a2 = graph.find("attention")
    assert a1.inputs[3].producer.op == "add" and a2.inputs[3].producer.op == "where"
    keep = keep_mask(BlockPattern(2, 1, 0), 11, 11)
    o1 = reference(inputs, keep, bias=inputs[3])
    o2 = reference([o1, *inputs[1:3]], keep)
    torch.testing.assert_close(interpret(graph, inputs)[0], o2)


def test_bidirectional_attention_is_refused():
    text = CAUSAL.replace(" {causal}", "")
    graph, rec, _, _ = convert(text, sparse_attention="window:4")
    assert rec.status == "unchanged" and "conversion_errors" not in graph.meta
    (miss,) = rec.near_misses
    assert miss.rule == "convert/sliding-window" and "not causal" in miss.reason
    assert_graph(graph, text)


def test_max_error_refuses():
    graph, rec, _, _ = convert(CAUSAL, sparse_attention="window:2", max_error=1e-3)
    assert rec.status == "unchanged" and not graph.find("attention")[0].attrs["window"]
    assert "> max_error 0.001" in rec.near_misses[0].reason


def test_a_window_wider_than_the_sequence_changes_nothing_measurable():
    graph, rec, _, _ = convert(CAUSAL, sparse_attention="window:64", max_error=0.0)
    assert rec.matched("convert/sliding-window") == 1
    assert graph.meta["conversion_errors"][0]["max_abs"] == 0.0
    assert graph.meta["conversion_errors"][0]["top1"] == 1.0


def test_pattern_parsing():
    assert parse_pattern("window:256") == WindowPattern(256)
    assert parse_pattern("block:64, local:4, global:1") == BlockPattern(64, 4, 1)
    assert parse_pattern("block:64,local:4") == BlockPattern(64, 4, 0)
    for bad in ("window", "window:0", "block:64", "stripes:3", "block:4,local:x"):
        with pytest.raises(ValueError):
            parse_pattern(bad)
    graph = parse_graph(CAUSAL)
    with pytest.raises(PassError, match="sparse_attention"):
        run_passes(graph, [PASS], options={"sparse_attention": "window:0"})
