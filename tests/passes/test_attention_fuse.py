"""attention.fuse-sdpa on text graphs: each spelling of attention (scale by mul / div /
pre-scaled q / √scale on q and k, K transposed alone or by a combined head permute,
fp32 softmax casts, eval dropout, 3-D bmm, softcap, ALiBi, masks by add / where) becomes
one ``attention`` with exact attrs; each way it must not fire is a near miss with its
reason; the frontend's attention gets its bias analysed."""

from __future__ import annotations

import math

import pytest
import torch
from pass_helpers import assert_graph, sample_inputs

from transfuse.codegen.python import generate_python
from transfuse.ir.graph import Graph
from transfuse.ir.interpret import interpret
from transfuse.ir.parser import parse_graph
from transfuse.ir.verify import verify
from transfuse.passes.attention.fuse import FuseAttention
from transfuse.passes.log import PassLog, PassRecord
from transfuse.passes.manager import compare_outputs, run_passes

PASS, DCE = FuseAttention.name, "cleanup.eliminate-dead-code"
QKV = "%q: f32[batch, 4, seq, 8], %k: f32[batch, 4, seq, 8], %v: f32[batch, 4, seq, 8]"


def fuse(text: str, *, tol: float = 1e-5, dce: bool = True,
         inputs: list | None = None) -> tuple[Graph, PassRecord, PassLog]:
    """Parse, run the fusion (then DCE) with verification, compare numerics (interpreter and
    python backend), return the graph, the fusion's record and the log."""
    graph = parse_graph(text)
    verify(graph)
    inputs = inputs or sample_inputs(graph)
    before = interpret(graph, inputs)
    passes = [PASS, DCE] if dce else [PASS]
    log = run_passes(graph, passes, verify=True, sample_inputs=inputs, rtol=max(tol, 1e-4),
                     atol=max(tol, 1e-5))
    for r in log.records:
        assert r.status in ("changed", "unchanged"), f"{r.name} {r.status}: {r.error}"
    verify(graph)
    check = compare_outputs(before, interpret(graph, inputs), rtol=tol, atol=tol)
    assert check.ok, check
    # the python backend lowers what the fusion made (SDPA, masks, GQA) to the same numbers
    check = compare_outputs(before, generate_python(graph)(inputs), rtol=tol, atol=tol)
    assert check.ok, f"python backend: {check}"
    return graph, log[PASS], log


def attn(graph: Graph):
    (node,) = graph.find("attention")
    return node


# -- spellings that fuse --------------------------------------------------------------------


def test_gpt2_style_causal_masked_fill():
    graph, rec, _ = fuse(f"""
graph main({QKV}) {{
  const %scale: f32[] = 0.3535533905932738
  const %ninf: f32[] = -inf
  %0: f32[batch, 4, 8, seq] = permute(%k) {{perm=[0, 1, 3, 2]}}
  %1: f32[batch, 4, seq, seq] = matmul(%q, %0)
  %2: f32[batch, 4, seq, seq] = mul(%1, %scale)
  %3: bool[seq, seq] = full() {{shape=[seq, seq], value=1.0, dtype=bool}}
  %4: bool[seq, seq] = triu(%3) {{diagonal=1}}
  %5: f32[batch, 4, seq, seq] = where(%4, %ninf, %2)
  %6: f32[batch, 4, seq, seq] = softmax(%5) {{axis=3}}
  %7: f32[batch, 4, seq, 8] = matmul(%6, %v)
  return %7
}}""")
    scale = float(torch.tensor(0.3535533905932738, dtype=torch.float32))
    assert_graph(graph, f"""
graph main({QKV}) {{
  %0: f32[batch, 4, seq, 8] = attention(%q, %k, %v) {{causal, scale={scale!r}}}
  return %0
}}""")
    assert rec.matched("attention/sdpa") == 1
    assert attn(graph).meta["origin"] == "attention.fuse-sdpa/attention/sdpa"
    assert not rec.near_misses


def test_additive_causal_mask_div_scale_and_padding_bias():
    """Llama/BERT style: scores / c + triu(finfo.min) + (1 - keep) * finfo.min [B, 1, 1, T].

    Right padding: a row whose every visible key is padded would tie the padded keys with
    the causally masked ones (both finfo.min) in the original; the fused op does not."""
    text = f"""
graph main({QKV}, %pad: bool[batch, 1, 1, seq]) {{
  const %c: f32[] = 3.0
  const %one: f32[] = 1.0
  const %min: f32[] = -3.4028234663852886e+38
  %0: f32[batch, 4, 8, seq] = permute(%k) {{perm=[0, 1, 3, 2]}}
  %1: f32[batch, 4, seq, seq] = matmul(%q, %0)
  %2: f32[batch, 4, seq, seq] = div(%1, %c)
  %3: f32[seq, seq] = full() {{shape=[seq, seq], value=-3.4028234663852886e+38, dtype=f32}}
  %4: f32[seq, seq] = triu(%3) {{diagonal=1}}
  %keep: f32[batch, 1, 1, seq] = cast(%pad) {{dtype=f32}}
  %5: f32[batch, 1, 1, seq] = sub(%one, %keep)
  %6: f32[batch, 1, 1, seq] = mul(%5, %min)
  %7: f32[batch, 1, seq, seq] = add(%4, %6)
  %8: f32[batch, 4, seq, seq] = add(%2, %7)
  %9: f32[batch, 4, seq, seq] = softmax(%8) {{axis=-1}}
  %10: f32[batch, 4, seq, 8] = matmul(%9, %v)
  return %10
}}"""
    inputs = sample_inputs(parse_graph(text))
    inputs[3] = torch.ones_like(inputs[3])
    inputs[3][1, ..., -2:] = False  # the second sequence's last two keys are padding
    graph, rec, _ = fuse(text, inputs=inputs)
    node = attn(graph)
    # div by c is scale 1/c, computed in float64 from the constant
    assert node.attrs["scale"] == 1.0 / 3.0 and node.attrs["causal"]
    bias = node.inputs[3]
    assert str(bias.type) == "f32[batch, 1, 1, seq]" and bias.producer.op == "mul"
    assert not graph.find("softmax") and not graph.find("triu")


@pytest.mark.parametrize("c", [8.0, math.sqrt(80.0), 0.1])
def test_div_scale_is_exact_reciprocal(c):
    graph, _, _ = fuse(f"""
graph main({QKV}) {{
  const %c: f32[] = {c!r}
  %0: f32[batch, 4, 8, seq] = permute(%k) {{perm=[0, 1, 3, 2]}}
  %1: f32[batch, 4, seq, seq] = matmul(%q, %0)
  %2: f32[batch, 4, seq, seq] = div(%1, %c)
  %3: f32[batch, 4, seq, seq] = softmax(%2) {{axis=3}}
  %4: f32[batch, 4, seq, 8] = matmul(%3, %v)
  return %4
}}""")
    c32 = float(torch.tensor(c, dtype=torch.float32))
    assert attn(graph).attrs["scale"] == 1.0 / c32


def test_pre_scaled_query_and_sqrt_scale_on_q_and_k():
    graph, _, _ = fuse(f"""
graph main({QKV}) {{
  const %a: f32[] = 0.5
  const %b: f32[] = 0.75
  %0: f32[batch, 4, seq, 8] = mul(%q, %a)
  %1: f32[batch, 4, seq, 8] = mul(%b, %k)
  %2: f32[batch, 4, 8, seq] = permute(%1) {{perm=[0, 1, 3, 2]}}
  %3: f32[batch, 4, seq, seq] = matmul(%0, %2)
  %4: f32[batch, 4, seq, seq] = softmax(%3) {{axis=3}}
  %5: f32[batch, 4, seq, 8] = matmul(%4, %v)
  return %5
}}""")
    assert_graph(graph, f"""
graph main({QKV}) {{
  %0: f32[batch, 4, seq, 8] = attention(%q, %k, %v) {{scale=0.375}}
  return %0
}}""")


def test_unscaled_scores_get_scale_one():
    graph, _, _ = fuse(f"""
graph main({QKV}) {{
  %0: f32[batch, 4, 8, seq] = permute(%k) {{perm=[0, 1, 3, 2]}}
  %1: f32[batch, 4, seq, seq] = matmul(%q, %0)
  %2: f32[batch, 4, seq, seq] = softmax(%1) {{axis=3}}
  %3: f32[batch, 4, seq, 8] = matmul(%2, %v)
  return %3
}}""")
    assert attn(graph).attrs["scale"] == 1.0  # not SDPA's default 1/sqrt(D)


def test_key_transposed_by_combined_head_permute():
    """K [B, T, H, D] permuted [0, 2, 3, 1] (view folding of transpose(1, 2).transpose(-1, -2))."""
    graph, _, _ = fuse("""
graph main(%q: f32[batch, 4, seq, 8], %k: f32[batch, seq, 4, 8], %v: f32[batch, 4, seq, 8]) {
  const %s: f32[] = 0.25
  %0: f32[batch, 4, 8, seq] = permute(%k) {perm=[0, 2, 3, 1]}
  %1: f32[batch, 4, seq, seq] = matmul(%q, %0)
  %2: f32[batch, 4, seq, seq] = mul(%1, %s)
  %3: f32[batch, 4, seq, seq] = softmax(%2) {axis=3}
  %4: f32[batch, 4, seq, 8] = matmul(%3, %v)
  return %4
}""")
    assert_graph(graph, """
graph main(%q: f32[batch, 4, seq, 8], %k: f32[batch, seq, 4, 8], %v: f32[batch, 4, seq, 8]) {
  %0: f32[batch, 4, seq, 8] = permute(%k) {perm=[0, 2, 1, 3]}
  %1: f32[batch, 4, seq, 8] = attention(%q, %0, %v) {scale=0.25}
  return %1
}""")


def test_fp32_softmax_casts_and_eval_dropout():
    graph, _, _ = fuse("""
graph main(%q: f16[2, 4, 6, 8], %k: f16[2, 4, 6, 8], %v: f16[2, 4, 6, 8]) {
  const %s: f16[] = 0.25
  %0: f16[2, 4, 8, 6] = permute(%k) {perm=[0, 1, 3, 2]}
  %1: f16[2, 4, 6, 6] = matmul(%q, %0)
  %2: f16[2, 4, 6, 6] = mul(%1, %s)
  %3: f32[2, 4, 6, 6] = cast(%2) {dtype=f32}
  %4: f32[2, 4, 6, 6] = softmax(%3) {axis=3}
  %5: f16[2, 4, 6, 6] = cast(%4) {dtype=f16}
  %6: f16[2, 4, 6, 6] = dropout(%5) {p=0.1}
  %7: f16[2, 4, 6, 8] = matmul(%6, %v)
  return %7
}""", tol=1e-2)
    assert_graph(graph, """
graph main(%q: f16[2, 4, 6, 8], %k: f16[2, 4, 6, 8], %v: f16[2, 4, 6, 8]) {
  %0: f16[2, 4, 6, 8] = attention(%q, %k, %v) {scale=0.25}
  return %0
}""")


def test_3d_bmm_form_gets_a_unit_head_axis():
    graph, rec, _ = fuse("""
graph main(%q: f32[n, seq, 8], %k: f32[n, seq, 8], %v: f32[n, seq, 8]) {
  const %c: f32[] = 2.0
  %0: f32[n, 8, seq] = permute(%k) {perm=[0, 2, 1]}
  %1: f32[n, seq, seq] = matmul(%q, %0)
  %2: f32[n, seq, seq] = div(%1, %c)
  %3: f32[n, seq, seq] = softmax(%2) {axis=2}
  %4: f32[n, seq, 8] = matmul(%3, %v)
  return %4
}""")
    assert_graph(graph, """
graph main(%q: f32[n, seq, 8], %k: f32[n, seq, 8], %v: f32[n, seq, 8]) {
  %0: f32[n, 1, seq, 8] = reshape(%q) {shape=[n, 1, seq, 8]}
  %1: f32[n, 1, seq, 8] = reshape(%k) {shape=[n, 1, seq, 8]}
  %2: f32[n, 1, seq, 8] = reshape(%v) {shape=[n, 1, seq, 8]}
  %3: f32[n, 1, seq, 8] = attention(%0, %1, %2) {scale=0.5}
  %4: f32[n, seq, 8] = reshape(%3) {shape=[n, seq, 8]}
  return %4
}""")
    assert rec.matched("attention/sdpa") == 1


def test_gemma2_softcap_before_the_mask():
    graph, _, _ = fuse(f"""
graph main({QKV}) {{
  const %s: f32[] = 0.25
  const %cap: f32[] = 2.0
  const %ninf: f32[] = -inf
  %0: f32[batch, 4, 8, seq] = permute(%k) {{perm=[0, 1, 3, 2]}}
  %1: f32[batch, 4, seq, seq] = matmul(%q, %0)
  %2: f32[batch, 4, seq, seq] = mul(%1, %s)
  %3: f32[batch, 4, seq, seq] = div(%2, %cap)
  %4: f32[batch, 4, seq, seq] = tanh(%3)
  %5: f32[batch, 4, seq, seq] = mul(%4, %cap)
  %6: bool[seq, seq] = full() {{shape=[seq, seq], value=1.0, dtype=bool}}
  %7: bool[seq, seq] = tril(%6)
  %8: f32[batch, 4, seq, seq] = where(%7, %5, %ninf)
  %9: f32[batch, 4, seq, seq] = softmax(%8) {{axis=3}}
  %10: f32[batch, 4, seq, 8] = matmul(%9, %v)
  return %10
}}""")
    assert_graph(graph, f"""
graph main({QKV}) {{
  %0: f32[batch, 4, seq, 8] = attention(%q, %k, %v) {{causal, scale=0.25, softcap=2.0}}
  return %0
}}""")


ALIBI_SLOPES = "[[[0.5]], [[0.25]], [[0.125]], [[0.0625]]]"


@pytest.mark.parametrize("relative", [True, False], ids=["j-i", "j"])
def test_alibi_bias_becomes_the_alibi_attr(relative):
    pos = ("""%3: i64[1, seq] = reshape(%0) {shape=[1, seq]}
  %4: i64[seq, 1] = reshape(%0) {shape=[seq, 1]}
  %5: i64[seq, seq] = sub(%3, %4)
  %6: f32[seq, seq] = cast(%5) {dtype=f32}
  %7: f32[4, seq, seq] = mul(%slopes, %6)""" if relative else
           """%3: i64[1, seq] = reshape(%0) {shape=[1, seq]}
  %6: f32[1, seq] = cast(%3) {dtype=f32}
  %7: f32[4, 1, seq] = mul(%6, %slopes)""")
    graph, rec, _ = fuse(f"""
graph main({QKV}) {{
  const %slopes: f32[4, 1, 1] = {ALIBI_SLOPES}
  const %s: f32[] = 0.25
  %0: i64[seq] = arange() {{end=seq}}
  %1: f32[seq, seq] = full() {{shape=[seq, seq], value=-inf, dtype=f32}}
  %2: f32[seq, seq] = triu(%1) {{diagonal=1}}
  {pos}
  %8: f32[4, seq, seq] = add(%7, %2)
  %9: f32[batch, 4, 8, seq] = permute(%k) {{perm=[0, 1, 3, 2]}}
  %10: f32[batch, 4, seq, seq] = matmul(%q, %9)
  %11: f32[batch, 4, seq, seq] = mul(%10, %s)
  %12: f32[batch, 4, seq, seq] = add(%11, %8)
  %13: f32[batch, 4, seq, seq] = softmax(%12) {{axis=3}}
  %14: f32[batch, 4, seq, 8] = matmul(%13, %v)
  return %14
}}""")
    assert_graph(graph, f"""
graph main({QKV}) {{
  %0: f32[batch, 4, seq, 8] = attention(%q, %k, %v) {{alibi=[0.5, 0.25, 0.125, 0.0625], causal, scale=0.25}}
  return %0
}}""")  # noqa: E501
    assert not rec.near_misses


def test_t5_style_position_bias_stays_a_bias():
    """An embedding lookup of bucketed relative positions is no ALiBi: an explicit bias."""
    graph, rec, _ = fuse(f"""
graph main({QKV}) {{
  const %table: f32[32, 4]
  const %sixteen: i64[] = 16
  %0: i64[seq] = arange() {{end=seq}}
  %1: i64[1, seq] = reshape(%0) {{shape=[1, seq]}}
  %2: i64[seq, 1] = reshape(%0) {{shape=[seq, 1]}}
  %3: i64[seq, seq] = sub(%1, %2)
  %off: i64[seq, seq] = add(%3, %sixteen)
  %4: f32[seq, seq, 4] = embedding(%table, %off)
  %5: f32[4, seq, seq] = permute(%4) {{perm=[2, 0, 1]}}
  %6: f32[batch, 4, 8, seq] = permute(%k) {{perm=[0, 1, 3, 2]}}
  %7: f32[batch, 4, seq, seq] = matmul(%q, %6)
  %8: f32[batch, 4, seq, seq] = add(%7, %5)
  %9: f32[batch, 4, seq, seq] = softmax(%8) {{axis=3}}
  %10: f32[batch, 4, seq, 8] = matmul(%9, %v)
  return %10
}}""")
    node = attn(graph)
    assert node.attrs["alibi"] is None and node.inputs[3].producer.op == "permute"
    (miss,) = rec.near_misses
    assert miss.rule == "attention/mask"


def test_mask_not_provably_causal_is_kept_as_bias():
    """Fusion still happens; the whole mask is the bias; the reason is an attention/mask
    near miss."""
    graph, rec, log = fuse(f"""
graph main({QKV}, %mask: f32[batch, 1, seq, seq]) {{
  const %s: f32[] = 0.25
  %0: f32[batch, 4, 8, seq] = permute(%k) {{perm=[0, 1, 3, 2]}}
  %1: f32[batch, 4, seq, seq] = matmul(%q, %0)
  %2: f32[batch, 4, seq, seq] = mul(%1, %s)
  %3: f32[batch, 4, seq, seq] = add(%2, %mask)
  %4: f32[batch, 4, seq, seq] = softmax(%3) {{axis=3}}
  %5: f32[batch, 4, seq, 8] = matmul(%4, %v)
  return %5
}}""")
    node = attn(graph)
    assert node.inputs[3] is graph.inputs[3] and not node.attrs["causal"]
    assert rec.matched("attention/sdpa") == 1
    (miss,) = rec.near_misses
    assert miss.rule == "attention/mask" and "%mask" in miss.reason
    assert "attention/mask" in log.why_not("attention/mask")


def test_offset_bool_mask_becomes_an_additive_bias():
    graph, rec, _ = fuse(f"""
graph main({QKV}) {{
  const %ninf: f32[] = -inf
  %0: f32[batch, 4, 8, seq] = permute(%k) {{perm=[0, 1, 3, 2]}}
  %1: f32[batch, 4, seq, seq] = matmul(%q, %0)
  %2: bool[seq, seq] = full() {{shape=[seq, seq], value=1.0, dtype=bool}}
  %3: bool[seq, seq] = triu(%2) {{diagonal=2}}
  %4: f32[batch, 4, seq, seq] = where(%3, %ninf, %1)
  %5: f32[batch, 4, seq, seq] = softmax(%4) {{axis=3}}
  %6: f32[batch, 4, seq, 8] = matmul(%5, %v)
  return %6
}}""")
    node = attn(graph)
    assert not node.attrs["causal"]
    bias = node.inputs[3]
    assert bias.producer.op == "where" and str(bias.type) == "f32[seq, seq]"
    (miss,) = rec.near_misses
    assert miss.rule == "attention/mask" and "offset" in miss.reason


def test_frontend_attention_bias_is_analysed():
    graph, rec, _ = fuse(f"""
graph main({QKV}) {{
  const %zero: f32[] = 0.0
  const %ninf: f32[] = -inf
  %0: bool[seq, seq] = full() {{shape=[seq, seq], value=1.0, dtype=bool}}
  %1: bool[seq, seq] = tril(%0)
  %2: f32[seq, seq] = where(%1, %zero, %ninf)
  %3: f32[batch, 4, seq, 8] = attention(%q, %k, %v, %2) {{scale=0.25}}
  return %3
}}""")
    assert_graph(graph, f"""
graph main({QKV}) {{
  %0: f32[batch, 4, seq, 8] = attention(%q, %k, %v) {{causal, scale=0.25}}
  return %0
}}""")
    assert rec.matched("attention/sdpa-mask") == 1


def test_frontend_attention_with_unknown_bias_is_left_alone():
    text = f"""
graph main({QKV}, %m: f32[batch, 1, seq, seq]) {{
  %0: f32[batch, 4, seq, 8] = attention(%q, %k, %v, %m) {{scale=0.25}}
  return %0
}}"""
    graph, rec, _ = fuse(text)
    assert_graph(graph, text)
    (miss,) = rec.near_misses
    assert miss.rule == "attention/mask" and "graph input %m" in miss.reason


# -- negative cases: the rewrite must not fire, and says why ----------------------------------


def _refused(text: str, why: str) -> PassLog:
    graph, rec, log = fuse(text, dce=False)
    assert_graph(graph, text)
    assert rec.matched("attention/sdpa") == 0
    misses = [m for m in rec.near_misses if m.rule == "attention/sdpa"]
    assert misses and why in misses[0].reason, rec.near_misses
    assert why in log.why_not("attention/sdpa")
    return log


def test_key_permuted_another_way_is_not_a_transpose():
    _refused("""
graph main(%q: f32[2, 4, 4, 4], %k: f32[2, 4, 4, 4], %v: f32[2, 4, 4, 4]) {
  %0: f32[2, 4, 4, 4] = permute(%k) {perm=[0, 2, 1, 3]}
  %1: f32[2, 4, 4, 4] = matmul(%q, %0)
  %2: f32[2, 4, 4, 4] = softmax(%1) {axis=3}
  %3: f32[2, 4, 4, 4] = matmul(%2, %v)
  return %3
}""", "not Kᵀ")


def test_softmax_over_another_axis():
    _refused(f"""
graph main({QKV}) {{
  %0: f32[batch, 4, 8, seq] = permute(%k) {{perm=[0, 1, 3, 2]}}
  %1: f32[batch, 4, seq, seq] = matmul(%q, %0)
  %2: f32[batch, 4, seq, seq] = softmax(%1) {{axis=2}}
  %3: f32[batch, 4, seq, 8] = matmul(%2, %v)
  return %3
}}""", "not the key axis")


def test_non_scalar_scale():
    _refused(f"""
graph main({QKV}) {{
  const %s: f32[1, 4, 1, 1] = [[[[0.1]], [[0.2]], [[0.3]], [[0.4]]]]
  %0: f32[batch, 4, 8, seq] = permute(%k) {{perm=[0, 1, 3, 2]}}
  %1: f32[batch, 4, seq, seq] = matmul(%q, %0)
  %2: f32[batch, 4, seq, seq] = mul(%1, %s)
  %3: f32[batch, 4, seq, seq] = softmax(%2) {{axis=3}}
  %4: f32[batch, 4, seq, 8] = matmul(%3, %v)
  return %4
}}""", "not a scalar")


def test_probabilities_returned_block_the_rewrite():
    """HF output_attentions=True: the probabilities are a graph output."""
    _refused(f"""
graph main({QKV}) {{
  const %s: f32[] = 0.25
  %0: f32[batch, 4, 8, seq] = permute(%k) {{perm=[0, 1, 3, 2]}}
  %1: f32[batch, 4, seq, seq] = matmul(%q, %0)
  %2: f32[batch, 4, seq, seq] = mul(%1, %s)
  %3: f32[batch, 4, seq, seq] = softmax(%2) {{axis=3}}
  %4: f32[batch, 4, seq, 8] = matmul(%3, %v)
  return %4, %3
}}""", "is a graph output")


def test_scores_used_elsewhere_block_the_rewrite():
    _refused(f"""
graph main({QKV}) {{
  const %s: f32[] = 0.25
  %0: f32[batch, 4, 8, seq] = permute(%k) {{perm=[0, 1, 3, 2]}}
  %1: f32[batch, 4, seq, seq] = matmul(%q, %0)
  %2: f32[batch, 4, seq, seq] = mul(%1, %s)
  %3: f32[batch, 4, seq, seq] = softmax(%2) {{axis=3}}
  %4: f32[batch, 4, seq, 8] = matmul(%3, %v)
  %5: f32[batch, 4, seq, 1] = reduce_max(%2) {{axes=[3], keepdim}}
  return %4, %5
}}""", "has another user")


def test_finite_masked_fill_value_is_refused():
    _refused(f"""
graph main({QKV}, %m: bool[batch, 1, seq, seq]) {{
  const %fill: f32[] = -100.0
  %0: f32[batch, 4, 8, seq] = permute(%k) {{perm=[0, 1, 3, 2]}}
  %1: f32[batch, 4, seq, seq] = matmul(%q, %0)
  %2: f32[batch, 4, seq, seq] = where(%m, %fill, %1)
  %3: f32[batch, 4, seq, seq] = softmax(%2) {{axis=3}}
  %4: f32[batch, 4, seq, 8] = matmul(%3, %v)
  return %4
}}""", "masked_fill value -100.0")


def test_training_dropout_is_refused():
    graph = parse_graph(f"""
graph main({QKV}) {{
  %0: f32[batch, 4, 8, seq] = permute(%k) {{perm=[0, 1, 3, 2]}}
  %1: f32[batch, 4, seq, seq] = matmul(%q, %0)
  %2: f32[batch, 4, seq, seq] = softmax(%1) {{axis=3}}
  %3: f32[batch, 4, seq, seq] = dropout(%2) {{p=0.1, train}}
  %4: f32[batch, 4, seq, 8] = matmul(%3, %v)
  return %4
}}""")
    log = run_passes(graph, [PASS])
    assert not graph.find("attention")
    assert "training mode" in log.why_not("attention/sdpa")
