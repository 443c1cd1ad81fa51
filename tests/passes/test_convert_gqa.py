"""convert.mha-to-gqa: mean-pooled kv heads, with the error measured and reported."""

import pytest
import torch
from pass_helpers import assert_graph, sample_inputs

from transfuse.errors import PassError
from transfuse.frontend.torch_export import capture
from transfuse.ir.interpret import interpret
from transfuse.ir.parser import parse_graph
from transfuse.ir.verify import verify
from transfuse.models import get_model
from transfuse.passes.attention.fuse import FuseAttention
from transfuse.passes.attention.gqa import RemoveRepeatKv
from transfuse.passes.manager import run_passes, run_pipeline
from transfuse.passes.recognize import RecognizeActivations, RecognizeNorms, RecognizeRotary

PASS = "convert.mha-to-gqa"
RULE = "convert/gqa"



def attention_block(h: int, hkv: int, d: int = 16, e: int = 32) -> str:
    """q/k/v projections (with bias) -> heads; K through a RoPE-like per-head rotation."""
    half = d // 2
    return f"""
graph main(%x: f32[batch, seq, {e}]) {{
  const %wq: f32[{h * d}, {e}]
  const %bq: f32[{h * d}]
  const %wk: f32[{hkv * d}, {e}]
  const %bk: f32[{hkv * d}]
  const %wv: f32[{hkv * d}, {e}]
  const %bv: f32[{hkv * d}]
  const %cos: f32[{d}]
  %q0: f32[batch, seq, {h * d}] = linear(%x, %wq, %bq)
  %q1: f32[batch, seq, {h}, {d}] = reshape(%q0) {{shape=[batch, seq, {h}, {d}]}}
  %q: f32[batch, {h}, seq, {d}] = permute(%q1) {{perm=[0, 2, 1, 3]}}
  %k0: f32[batch, seq, {hkv * d}] = linear(%x, %wk, %bk)  # @h.0.attn.k
  %k1: f32[batch, seq, {hkv}, {d}] = reshape(%k0) {{shape=[batch, seq, {hkv}, {d}]}}
  %k2: f32[batch, {hkv}, seq, {d}] = permute(%k1) {{perm=[0, 2, 1, 3]}}
  %k3: f32[batch, {hkv}, seq, {half}] = slice(%k2) {{axis=3, end={half}}}
  %k4: f32[batch, {hkv}, seq, {half}] = slice(%k2) {{axis=3, start={half}}}
  %k5: f32[batch, {hkv}, seq, {half}] = neg(%k4)
  %k6: f32[batch, {hkv}, seq, {d}] = concat(%k5, %k3) {{axis=3}}
  %k7: f32[batch, {hkv}, seq, {d}] = mul(%k2, %cos)
  %k: f32[batch, {hkv}, seq, {d}] = add(%k7, %k6)
  %v0: f32[batch, seq, {hkv * d}] = linear(%x, %wv, %bv)
  %v1: f32[batch, seq, {hkv}, {d}] = reshape(%v0) {{shape=[batch, seq, {hkv}, {d}]}}
  %v: f32[batch, {hkv}, seq, {d}] = permute(%v1) {{perm=[0, 2, 1, 3]}}
  %o: f32[batch, {h}, seq, {d}] = attention(%q, %k, %v) {{causal, kv_heads={hkv}}}  # @h.0.attn
  return %o
}}"""


MHA = attention_block(4, 2)
GQA = attention_block(4, 1)


def mean_of_heads(t, heads, d=16):
    """Plain-torch mean pooling into one head: the average of the heads' row blocks."""
    return sum(t[h * d:(h + 1) * d] for h in range(heads)) / heads


def convert(text, **options):
    graph = parse_graph(text)
    original = graph.clone()
    log = run_passes(graph, [PASS], options=options)
    verify(graph)
    return original, graph, log.records[0]


def test_mean_pools_kv_heads_through_rope():
    original, graph, rec = convert(MHA, convert_gqa=1)
    assert_graph(graph, GQA)
    assert rec.matched(RULE) == 1 and rec.status == "changed"
    (attn,) = graph.find("attention")
    assert attn.attrs["kv_heads"] == 1 and attn.source == "h.0.attn"
    assert graph.find("linear")[1].meta["origin"] == f"{PASS}/{RULE}"
    # numerics: the converted graph is the hand-pooled MHA graph
    c = {n: v.const for n, v in original.constants.items()}
    expected = parse_graph(GQA, constants={
        "wq": c["wq"], "bq": c["bq"], "cos": c["cos"],
        "wk": mean_of_heads(c["wk"], 2), "bk": mean_of_heads(c["bk"], 2),
        "wv": mean_of_heads(c["wv"], 2), "bv": mean_of_heads(c["bv"], 2)})
    inputs = sample_inputs(graph)
    torch.testing.assert_close(interpret(graph, inputs), interpret(expected, inputs))
    # the error report: pass log note and graph.meta
    (err,) = graph.meta["conversion_errors"]
    assert err["conversion"] == "gqa" and err["extra"]["kv_bytes_saved_per_token"] == 2 * 16 * 4
    assert 0 < err["max_abs"] and -1 <= err["cosine"] <= 1 and 0 <= err["top1"] <= 1
    assert any("kv bytes saved per token 128" in n and "cosine" in n for n in rec.notes)


def test_merged_qkv_projection_is_pooled_in_place():
    graph = parse_graph(MHA)
    inputs = sample_inputs(graph)
    plain = graph.clone()
    run_passes(plain, [PASS], options={"convert_gqa": 1})
    log = run_passes(graph, ["fusion.merge-projections", PASS], options={"convert_gqa": 1})
    verify(graph)
    assert log.records[1].matched(RULE) == 1
    (split,) = graph.find("split")
    assert list(split.attrs["sizes"]) == [64, 16, 16]
    assert graph.find("linear")[0].inputs[1].type.shape == (96, 32)
    torch.testing.assert_close(interpret(graph, inputs), interpret(plain, inputs),
                               rtol=1e-5, atol=1e-5)


def test_groups_of_two_heads():
    original, graph, rec = convert(attention_block(8, 4), convert_gqa=2)
    assert_graph(graph, attention_block(8, 2))
    assert rec.matched(RULE) == 1
    wk_old = original.constants["wk"].const
    wk_new = graph.find("linear")[1].inputs[1].const
    torch.testing.assert_close(wk_new[:16], (wk_old[:16] + wk_old[16:32]) / 2)
    torch.testing.assert_close(wk_new[16:], (wk_old[32:48] + wk_old[48:]) / 2)
    assert graph.meta["conversion_errors"][0]["extra"]["kv_bytes_saved_per_token"] == \
        2 * 2 * 16 * 4


@pytest.mark.parametrize("h, hkv, g, reason", [
    (6, 3, 2, "3 kv heads are not divisible into 2 groups (Hkv % G != 0)"),
    (4, 2, 4, "already 2 kv heads, fewer than convert_gqa=4"),
])
def test_heads_that_do_not_group(h, hkv, g, reason):
    text = attention_block(h, hkv)
    _, graph, rec = convert(text, convert_gqa=g)
    assert rec.status == "unchanged" and "conversion_errors" not in graph.meta
    (miss,) = rec.near_misses
    assert miss.reason == reason and miss.rule == RULE
    assert_graph(graph, text)


def test_kv_not_from_a_projection():
    text = """
graph main(%q: f32[batch, 6, seq, 8], %k: f32[batch, 3, seq, 8], %x: f32[batch, seq, 24]) {
  const %wv: f32[24, 24]
  %v0: f32[batch, seq, 24] = linear(%x, %wv, _)
  %v1: f32[batch, seq, 3, 8] = reshape(%v0) {shape=[batch, seq, 3, 8]}
  %v: f32[batch, 3, seq, 8] = permute(%v1) {perm=[0, 2, 1, 3]}
  %o: f32[batch, 6, seq, 8] = attention(%q, %k, %v) {causal, kv_heads=3}
  return %o
}"""
    _, graph, rec = convert(text, convert_gqa=1)
    assert rec.status == "unchanged"
    (miss,) = rec.near_misses
    assert "k: comes from an input" in miss.reason


def test_max_error_refuses_and_leaves_the_graph():
    graph = parse_graph(MHA)
    before = str(graph)
    log = run_passes(graph, [PASS], options={"convert_gqa": 1, "max_error": 1e-6})
    rec = log.records[0]
    assert rec.status == "unchanged" and str(graph) == before
    assert "conversion_errors" not in graph.meta
    (miss,) = rec.near_misses
    assert miss.reason.startswith("convert/gqa: error ") and "> max_error 1e-06" in miss.reason


def test_no_option_no_change_and_bad_option():
    graph = parse_graph(MHA)
    assert run_passes(graph, [PASS]).records[0].status == "unchanged"
    with pytest.raises(PassError, match="convert_gqa"):
        run_passes(graph, [PASS], options={"convert_gqa": 0})


@pytest.mark.parametrize("rotary", [True, False], ids=["rotary-op", "decomposed-rope"])
def test_llama_tiny_two_kv_heads_to_one(rotary):
    model, inputs, dynamic = get_model("llama-tiny", seq=16)
    captured = capture(model, inputs, dynamic=dynamic)
    graph = captured.graph
    run_pipeline(graph, "O1")
    prepare = [RecognizeNorms, RecognizeActivations, *([RecognizeRotary] if rotary else []),
               FuseAttention, RemoveRepeatKv]
    run_passes(graph, prepare)
    # the conversion below needs the upstream fusions: if they stop firing, this must fail
    assert [a.attrs["kv_heads"] for a in graph.find("attention")] == [2, 2], str(graph)
    before = interpret(graph, captured.example_inputs)[0]
    log = run_passes(graph, [PASS, "fusion.merge-projections"],
                     options={"convert_gqa": 1, "sample_inputs": captured.example_inputs})
    verify(graph)
    rec = log.records[0]
    assert rec.matched(RULE) == 2, str(log)
    assert all(a.attrs["kv_heads"] == 1 for a in graph.find("attention"))
    (err,) = graph.meta["conversion_errors"]
    assert err["extra"]["kv_bytes_saved_per_token"] == 2 * 2 * (2 - 1) * 16 * 4
    after = interpret(graph, captured.example_inputs)[0]
    assert err["max_abs"] == pytest.approx(float((after - before).abs().max()), rel=1e-4)
    assert 0.5 < err["cosine"] < 1.0


def test_bshd_layout_reshape_feeds_attention_directly():
    text = """
graph main(%q: f32[batch, seq, 4, 8], %x: f32[batch, seq, 16]) {
  const %wk: f32[32, 16]
  const %wv: f32[32, 16]
  %k0: f32[batch, seq, 32] = linear(%x, %wk, _)
  %k: f32[batch, seq, 4, 8] = reshape(%k0) {shape=[batch, seq, 4, 8]}
  %v0: f32[batch, seq, 32] = linear(%x, %wv, _)
  %v: f32[batch, seq, 4, 8] = reshape(%v0) {shape=[batch, seq, 4, 8]}
  %o: f32[batch, seq, 4, 8] = attention(%q, %k, %v) {causal, layout="bshd"}
  return %o
}"""
    _, graph, rec = convert(text, convert_gqa=2)
    assert rec.matched(RULE) == 1
    assert_graph(graph, """
graph main(%q: f32[batch, seq, 4, 8], %x: f32[batch, seq, 16]) {
  const %wk: f32[16, 16]
  const %wv: f32[16, 16]
  %k0: f32[batch, seq, 16] = linear(%x, %wk, _)
  %k: f32[batch, seq, 2, 8] = reshape(%k0) {shape=[batch, seq, 2, 8]}
  %v0: f32[batch, seq, 16] = linear(%x, %wv, _)
  %v: f32[batch, seq, 2, 8] = reshape(%v0) {shape=[batch, seq, 2, 8]}
  %o: f32[batch, seq, 4, 8] = attention(%q, %k, %v) {causal, kv_heads=2, layout="bshd"}
  return %o
}""")
