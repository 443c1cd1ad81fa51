"""fusion.merge-projections: q/k/v, gate/up and parallel blocks -> one linear + split."""

import pytest
import torch
from pass_helpers import apply, assert_graph, sample_inputs

from transfuse.frontend.torch_export import capture
from transfuse.ir.interpret import interpret
from transfuse.ir.parser import parse_graph
from transfuse.models import get_model
from transfuse.passes.fusion.merge_projections import merged_name
from transfuse.passes.manager import compare_outputs, run_passes, run_pipeline

PASS = "fusion.merge-projections"


def test_merges_qkv_with_bias_gqa_sizes():
    graph, rec = apply("""
graph main(%x: f32[batch, seq, 16]) {
  const %h_0_attn_q_weight: f32[16, 16]
  const %h_0_attn_q_bias: f32[16]
  const %h_0_attn_k_weight: f32[8, 16]
  const %h_0_attn_k_bias: f32[8]
  const %h_0_attn_v_weight: f32[8, 16]
  const %h_0_attn_v_bias: f32[8]
  %q: f32[batch, seq, 16] = linear(%x, %h_0_attn_q_weight, %h_0_attn_q_bias)  # @h.0.attn.q
  %k: f32[batch, seq, 8] = linear(%x, %h_0_attn_k_weight, %h_0_attn_k_bias)  # @h.0.attn.k
  %v: f32[batch, seq, 8] = linear(%x, %h_0_attn_v_weight, %h_0_attn_v_bias)  # @h.0.attn.v
  %s: f32[batch, seq, 8] = add(%k, %v)
  return %q, %s
}""", PASS, rtol=1e-5, atol=1e-6)
    assert_graph(graph, """
graph main(%x: f32[batch, seq, 16]) {
  const %w: f32[32, 16]
  const %b: f32[32]
  %0: f32[batch, seq, 32] = linear(%x, %w, %b)
  %q: f32[batch, seq, 16], %k: f32[batch, seq, 8], %v: f32[batch, seq, 8] = split(%0) {axis=-1, sizes=[16, 8, 8]}
  %s: f32[batch, seq, 8] = add(%k, %v)
  return %q, %s
}""")
    assert rec.matched("merge/qkv") == 1 and rec.matched("merge/gate-up") == 0
    assert rec.op_delta == {"linear": -2, "split": 1}
    assert set(graph.constants) == {"h_0_attn_qkv_weight", "h_0_attn_qkv_bias"}
    fused = graph.find("linear")[0]
    assert fused.source == "h.0.attn.q"
    assert fused.meta["origin"] == "fusion.merge-projections/merge/qkv"
    assert any("weight bytes 2176 before, 2176 after" in n for n in rec.notes)


def test_gate_up_pair_of_a_gated_mlp():
    graph, rec = apply("""
graph main(%x: f32[batch, seq, 8]) {
  const %mlp_gate_proj_weight: f32[24, 8]
  const %mlp_up_proj_weight: f32[24, 8]
  const %mlp_down_proj_weight: f32[8, 24]
  %g: f32[batch, seq, 24] = linear(%x, %mlp_gate_proj_weight, _)
  %a: f32[batch, seq, 24] = silu(%g)
  %u: f32[batch, seq, 24] = linear(%x, %mlp_up_proj_weight, _)
  %m: f32[batch, seq, 24] = mul(%a, %u)
  %d: f32[batch, seq, 8] = linear(%m, %mlp_down_proj_weight, _)
  return %d
}""", PASS, rtol=1e-5, atol=1e-6)
    assert_graph(graph, """
graph main(%x: f32[batch, seq, 8]) {
  const %gu: f32[48, 8]
  const %down: f32[8, 24]
  %0: f32[batch, seq, 48] = linear(%x, %gu, _)
  %g: f32[batch, seq, 24], %u: f32[batch, seq, 24] = split(%0) {axis=-1, sizes=[24, 24]}
  %a: f32[batch, seq, 24] = silu(%g)
  %m: f32[batch, seq, 24] = mul(%a, %u)
  %d: f32[batch, seq, 8] = linear(%m, %down, _)
  return %d
}""")
    assert rec.matched("merge/gate-up") == 1
    assert "mlp_gate_up_proj_weight" in graph.constants


PARALLEL_BLOCK = """
graph main(%x: f32[batch, seq, 16]) {
  const %ln_w: f32[16]
  const %ln_b: f32[16]
  const %h_0_attn_q_weight: f32[16, 16]
  const %h_0_attn_k_weight: f32[4, 16]
  const %h_0_attn_v_weight: f32[4, 16]
  const %h_0_mlp_fc_in_weight: f32[64, 16]
  const %h_0_mlp_fc_out_weight: f32[16, 64]
  %n: f32[batch, seq, 16] = layer_norm(%x, %ln_w, %ln_b)  # @h.0.ln
  %q: f32[batch, seq, 16] = linear(%n, %h_0_attn_q_weight, _)  # @h.0.attn.q
  %k: f32[batch, seq, 4] = linear(%n, %h_0_attn_k_weight, _)  # @h.0.attn.k
  %v: f32[batch, seq, 4] = linear(%n, %h_0_attn_v_weight, _)  # @h.0.attn.v
  %q4: f32[batch, seq, 4, 4] = reshape(%q) {shape=[batch, seq, 4, 4]}
  %qt: f32[batch, 4, seq, 4] = permute(%q4) {perm=[0, 2, 1, 3]}
  %k4: f32[batch, seq, 1, 4] = reshape(%k) {shape=[batch, seq, 1, 4]}
  %kt: f32[batch, 1, seq, 4] = permute(%k4) {perm=[0, 2, 1, 3]}
  %v4: f32[batch, seq, 1, 4] = reshape(%v) {shape=[batch, seq, 1, 4]}
  %vt: f32[batch, 1, seq, 4] = permute(%v4) {perm=[0, 2, 1, 3]}
  %o: f32[batch, 4, seq, 4] = attention(%qt, %kt, %vt) {causal, kv_heads=1}
  %ot: f32[batch, seq, 4, 4] = permute(%o) {perm=[0, 2, 1, 3]}
  %attn: f32[batch, seq, 16] = reshape(%ot) {shape=[batch, seq, 16]}
  %f: f32[batch, seq, 64] = linear(%n, %h_0_mlp_fc_in_weight, _)  # @h.0.mlp.fc_in
  %g: f32[batch, seq, 64] = gelu(%f)
  %mlp: f32[batch, seq, 16] = linear(%g, %h_0_mlp_fc_out_weight, _)
  %y0: f32[batch, seq, 16] = add(%x, %attn)
  %y: f32[batch, seq, 16] = add(%y0, %mlp)
  return %y
}"""


def test_parallel_attention_and_mlp_read_one_norm():
    # the merged GEMM sums in another order: outputs near zero differ by a few ulps of the
    # terms (measured 2.4e-6 on this machine's MKL), so atol is set by the terms' size
    graph, rec = apply(PARALLEL_BLOCK, PASS, rtol=1e-5, atol=1e-5)
    assert rec.matched("merge/qkv") == 1
    (split,) = graph.find("split")
    assert list(split.attrs["sizes"]) == [16, 4, 4, 64]
    assert len(graph.find("linear")) == 2  # the merged one and fc_out
    assert "h_0_merged_weight" in graph.constants


def test_tied_weight_is_never_merged():
    text = """
graph main(%x: f32[batch, 8], %ids: i64[batch]) {
  const %wte: f32[16, 8]
  const %other: f32[16, 8]
  %e: f32[batch, 8] = embedding(%wte, %ids)
  %a: f32[batch, 16] = linear(%x, %wte, _)
  %b: f32[batch, 16] = linear(%x, %other, _)
  return %e, %a, %b
}"""
    graph, rec = apply(text, PASS)
    assert rec.status == "unchanged"
    assert_graph(graph, text)
    (miss,) = rec.near_misses
    assert miss.rule == "merge/gate-up" and "weight is shared" in miss.reason


def test_other_inputs_and_mixed_bias_stay_apart():
    text = """
graph main(%x: f32[batch, 8], %y: f32[batch, 8]) {
  const %w1: f32[4, 8]
  const %w2: f32[4, 8]
  const %w3: f32[4, 8]
  const %b3: f32[4]
  %a: f32[batch, 4] = linear(%x, %w1, _)
  %b: f32[batch, 4] = linear(%y, %w2, _)
  %c: f32[batch, 4] = linear(%y, %w3, %b3)
  return %a, %b, %c
}"""
    graph, rec = apply(text, PASS)
    assert rec.status == "unchanged"
    assert_graph(graph, text)
    assert rec.rules["merge/gate-up"]["matched"] == 0
    assert any("bias" in m.reason for m in rec.near_misses)


def test_merged_name():
    assert merged_name(["h_0_attn_q_weight", "h_0_attn_k_weight", "h_0_attn_v_weight"],
                       "merged_weight") == "h_0_attn_qkv_weight"
    assert merged_name(["mlp_gate_proj_weight", "mlp_up_proj_weight"], "m") == \
        "mlp_gate_up_proj_weight"
    assert merged_name(["a_attn_q_weight", "a_mlp_fc_in_weight"], "merged_weight") == \
        "a_merged_weight"


@pytest.mark.parametrize("name, qkv, gate_up", [("gpt2-tiny", 2, 0), ("llama-tiny", 2, 2)])
def test_reference_models(name, qkv, gate_up):
    model, inputs, dynamic = get_model(name, seq=8)
    captured = capture(model, inputs, dynamic=dynamic)
    graph = captured.graph
    run_pipeline(graph, "O1")
    before = interpret(graph, captured.example_inputs)
    log = run_passes(graph, [PASS], verify=True, sample_inputs=captured.example_inputs)
    rec = log.records[0]
    assert rec.status == "changed", str(log)
    assert rec.matched("merge/qkv") == qkv and rec.matched("merge/gate-up") == gate_up
    check = compare_outputs(before, interpret(graph, captured.example_inputs), rtol=1e-5,
                            atol=1e-5)
    assert check.ok, check


def test_numerics_on_random_inputs_match_the_unmerged_graph():
    graph = parse_graph(PARALLEL_BLOCK)
    inputs = sample_inputs(graph, {"seq": 7})
    before = interpret(graph, inputs)
    run_passes(graph, [PASS])
    after = interpret(graph, inputs)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)  # merged GEMM: another summation order


def test_different_folded_activations_stay_apart():
    text = """
graph main(%x: f32[batch, 8]) {
  const %wg: f32[4, 8]
  const %wu: f32[4, 8]
  %g: f32[batch, 4] = linear(%x, %wg, _) {activation="silu"}
  %u: f32[batch, 4] = linear(%x, %wu, _)
  return %g, %u
}"""
    graph, rec = apply(text, PASS)
    assert rec.status == "unchanged"
    assert "activation silu" in rec.near_misses[0].reason
