"""attention.fuse-sdpa on the spellings real models use beyond one mask: several mask steps
(T5's position bias then the mask; ALiBi then a separate causal masked_fill), ALiBi as a
constant table or a slice of one (MPT), and BLOOM's 3-D bmm scores viewed as
[B, H, S, T] around the softmax. Each fuses to one ``attention`` with exact attrs and
the same numbers; each way it must not fire says why."""

from __future__ import annotations

import torch
from pass_helpers import assert_graph
from test_attention_fuse import QKV, attn, fuse

SLOPES = [0.5, 0.25, 0.125, 0.0625]
SLOPES_LIT = "[[[0.5]], [[0.25]], [[0.125]], [[0.0625]]]"
ALIBI_ATTR = "alibi=[0.5, 0.25, 0.125, 0.0625]"


def _literal(t: torch.Tensor) -> str:
    return repr(t.tolist()).replace(" ", "")


def _refused(text: str, why: str, rule: str = "attention/sdpa") -> None:
    graph, rec, log = fuse(text, dce=False)
    assert_graph(graph, text)
    assert rec.matched("attention/sdpa") == rec.matched("attention/sdpa-view") == 0
    misses = [m for m in rec.near_misses if m.rule == rule]
    assert misses and why in misses[0].reason, rec.near_misses
    assert why in log.why_not(rule)


# -- several mask steps -------------------------------------------------------------------------

T5_BIAS = """const %table: f32[32, 4]
  const %sixteen: i64[] = 16
  %0: i64[seq] = arange() {end=seq}
  %1: i64[1, seq] = reshape(%0) {shape=[1, seq]}
  %2: i64[seq, 1] = reshape(%0) {shape=[seq, 1]}
  %3: i64[seq, seq] = sub(%1, %2)
  %off: i64[seq, seq] = add(%3, %sixteen)
  %4: f32[seq, seq, 4] = embedding(%table, %off)
  %bias: f32[4, seq, seq] = permute(%4) {perm=[2, 0, 1]}
  %m0: f32[seq, seq] = full() {shape=[seq, seq], value=-inf, dtype=f32}
  %mask: f32[seq, seq] = triu(%m0) {diagonal=1}"""


def _t5_layer(n: int) -> str:
    return f"""%kt{n}: f32[batch, 4, 8, seq] = permute(%k) {{perm=[0, 1, 3, 2]}}
  %qk{n}: f32[batch, 4, seq, seq] = matmul(%q, %kt{n})
  %b{n}: f32[batch, 4, seq, seq] = add(%qk{n}, %bias)
  %s{n}: f32[batch, 4, seq, seq] = add(%b{n}, %mask)
  %p{n}: f32[batch, 4, seq, seq] = softmax(%s{n}) {{axis=3}}
  %o{n}: f32[batch, 4, seq, 8] = matmul(%p{n}, %v)"""


def test_t5_position_bias_then_causal_mask_shares_one_bias():
    """Two layers add the same position bias, then the causal mask: the mask becomes
    ``causal``, the bias stays one value used by both attention ops."""
    graph, rec, _ = fuse(f"""
graph main({QKV}) {{
  {T5_BIAS}
  {_t5_layer(0)}
  {_t5_layer(1)}
  return %o0, %o1
}}""")
    nodes = graph.find("attention")
    assert len(nodes) == 2 and rec.matched("attention/sdpa") == 2
    assert all(n.attrs["causal"] and n.attrs["alibi"] is None and n.attrs["scale"] == 1.0
               for n in nodes)
    assert nodes[0].inputs[3] is nodes[1].inputs[3]
    assert nodes[0].inputs[3].producer.op == "permute"  # the bias itself, not a copy


def _alibi_then_masked_fill(extra_use: bool = False) -> str:
    return f"""
graph main({QKV}) {{
  const %slopes: f32[4, 1, 1] = {SLOPES_LIT}
  const %s: f32[] = 0.25
  const %fill: f32[] = -3.4028235e+38
  %0: i64[seq] = arange() {{end=seq}}
  %1: i64[1, seq] = reshape(%0) {{shape=[1, seq]}}
  %2: i64[seq, 1] = reshape(%0) {{shape=[seq, 1]}}
  %3: i64[seq, seq] = sub(%1, %2)
  %4: f32[seq, seq] = cast(%3) {{dtype=f32}}
  %alibi: f32[4, seq, seq] = mul(%slopes, %4)
  %t: bool[seq, seq] = full() {{shape=[seq, seq], value=1.0, dtype=bool}}
  %masked: bool[seq, seq] = triu(%t) {{diagonal=1}}
  %kt: f32[batch, 4, 8, seq] = permute(%k) {{perm=[0, 1, 3, 2]}}
  %qk: f32[batch, 4, seq, seq] = matmul(%q, %kt)
  %sc: f32[batch, 4, seq, seq] = mul(%qk, %s)
  %ab: f32[batch, 4, seq, seq] = add(%sc, %alibi)
  %mf: f32[batch, 4, seq, seq] = where(%masked, %fill, %ab)
  %p: f32[batch, 4, seq, seq] = softmax(%mf) {{axis=3}}
  %o: f32[batch, 4, seq, 8] = matmul(%p, %v)
  {'%r: f32[batch, 4, seq, 1] = reduce_max(%ab) {axes=[3], keepdim}' if extra_use else ''}
  return %o{', %r' if extra_use else ''}
}}"""


def test_alibi_then_a_separate_causal_masked_fill():
    graph, rec, _ = fuse(_alibi_then_masked_fill())
    assert_graph(graph, f"""
graph main({QKV}) {{
  %0: f32[batch, 4, seq, 8] = attention(%q, %k, %v) {{{ALIBI_ATTR}, causal, scale=0.25}}
  return %0
}}""")
    assert rec.matched("attention/mask") == 1 and not rec.near_misses  # the bool mask


def test_alibi_scores_used_elsewhere_block_the_rewrite():
    _refused(_alibi_then_masked_fill(extra_use=True), "has another user")


def test_unproven_mask_step_stays_a_bias_next_to_alibi():
    """ALiBi is proven, the bool mask from an input is not: it becomes the bias (and says
    why), the fusion still happens."""
    text = _alibi_then_masked_fill().replace(f"graph main({QKV})",
                                             f"graph main({QKV}, %user: bool[seq, seq])")
    text = text.replace("where(%masked,", "where(%user,")
    graph, rec, log = fuse(text)
    node = attn(graph)
    assert node.attrs["alibi"] == tuple(SLOPES) and not node.attrs["causal"]
    assert node.inputs[3].producer.op == "where"
    assert "user" in log.why_not("attention/mask")


# -- ALiBi tables (MPT) ---------------------------------------------------------------------------

def _table(slopes: list[float], length: int) -> torch.Tensor:
    """MPT's table: slope_h · (j - (length - 1)) over [H, 1, length]."""
    return torch.tensor(slopes)[:, None, None] * (torch.arange(length) - (length - 1)).float()


def _table_graph(table: torch.Tensor, scores: str) -> str:
    h, _, p = table.shape
    return f"""
graph main({QKV}) {{
  const %table: f32[{h}, 1, {p}] = {_literal(table)}
  const %s: f32[] = 0.25
  const %fill: f32[] = -inf
  %pb: f32[4, 1, seq] = slice(%table) {{axis=2, start={p}-seq}}
  %t: bool[seq, seq] = full() {{shape=[seq, seq], value=1.0, dtype=bool}}
  %masked: bool[seq, seq] = triu(%t) {{diagonal=1}}
  %kt: f32[batch, 4, 8, seq] = permute(%k) {{perm=[0, 1, 3, 2]}}
  %qk: f32[batch, 4, seq, seq] = matmul(%q, %kt)
  %sc: f32[batch, 4, seq, seq] = mul(%qk, %s)
  %ab: f32[batch, 4, seq, seq] = add({scores})
  %mf: f32[batch, 4, seq, seq] = where(%masked, %fill, %ab)
  %p: f32[batch, 4, seq, seq] = softmax(%mf) {{axis=3}}
  %o: f32[batch, 4, seq, 8] = matmul(%p, %v)
  return %o
}}"""


def test_sliced_constant_alibi_table():
    """MPT: a table built for max_seq_len, its last T keys added (symbolic slice start)."""
    slopes = [1 / 3, 0.25, 0.1, 0.0625]  # not powers of two: fitted within rounding
    graph, rec, _ = fuse(_table_graph(_table(slopes, 16), "%sc, %pb"))
    node = attn(graph)
    assert node.attrs["causal"] and len(node.inputs) == 3
    assert max(abs(a - b) for a, b in zip(node.attrs["alibi"], slopes)) < 1e-6


def test_constant_table_that_is_no_alibi_stays_a_bias():
    """One element off by far more than rounding: the table is a bias, with the reason."""
    table = _table(SLOPES, 16)
    table[2, 0, 9] += 1e-3
    graph, rec, log = fuse(_table_graph(table, "%sc, %pb"))
    node = attn(graph)
    assert node.attrs["alibi"] is None and node.inputs[3].producer.op == "slice"
    assert rec.near_misses and "mask kept as an explicit bias" in log.why_not("attention/mask")


# -- BLOOM: bmm scores viewed as [B, H, S, T] -----------------------------------------------------

def _bloom(b: int, view: str = "", probs: str = "", mask: bool = True) -> str:
    bh = 4 * b
    slopes = torch.tensor(SLOPES * b)[:, None, None]
    view = view or f"{b}, 4, seq, seq"
    probs = probs or f"{bh}, seq, seq"
    return f"""
graph main(%q: f32[{bh}, seq, 8], %k: f32[{bh}, seq, 8], %v: f32[{bh}, seq, 8]) {{
  const %slopes: f32[{bh}, 1, 1] = {_literal(slopes)}
  const %s: f32[] = 0.25
  const %zero: f32[] = 0.0
  %0: i64[seq] = arange() {{end=seq}}
  %alibi: f32[{bh}, 1, seq] = mul(%slopes, %0)
  %m0: f32[seq, seq] = full() {{shape=[seq, seq], value=-inf, dtype=f32}}
  %mask: f32[seq, seq] = triu(%m0) {{diagonal=1}}
  %kt: f32[{bh}, 8, seq] = permute(%k) {{perm=[0, 2, 1]}}
  %qk: f32[{bh}, seq, seq] = matmul(%q, %kt)
  %sc: f32[{bh}, seq, seq] = mul(%qk, %s)
  %ab: f32[{bh}, seq, seq] = add(%alibi, %sc)
  %s4: f32[{view}] = reshape(%ab) {{shape=[{view}]}}
  %mk: f32[{view}] = {"add(%s4, %mask)" if mask else "add(%s4, %zero)"}
  %p4: f32[{view}] = softmax(%mk) {{axis=3}}
  %p3: f32[{probs}] = reshape(%p4) {{shape=[{probs}]}}
  %o: f32[{bh}, seq, 8] = matmul(%p3, %v)
  return %o
}}"""


def test_bloom_bmm_scores_viewed_as_heads_fuse_with_alibi():
    graph, rec, _ = fuse(_bloom(1))
    assert_graph(graph, f"""
graph main(%q: f32[4, seq, 8], %k: f32[4, seq, 8], %v: f32[4, seq, 8]) {{
  %0: f32[1, 4, seq, 8] = reshape(%q) {{shape=[1, 4, seq, 8]}}
  %1: f32[1, 4, seq, 8] = reshape(%k) {{shape=[1, 4, seq, 8]}}
  %2: f32[1, 4, seq, 8] = reshape(%v) {{shape=[1, 4, seq, 8]}}
  %3: f32[1, 4, seq, 8] = attention(%0, %1, %2) {{{ALIBI_ATTR}, causal, scale=0.25}}
  %4: f32[4, seq, 8] = reshape(%3) {{shape=[4, seq, 8]}}
  return %4
}}""")
    assert rec.matched("attention/sdpa-view") == 1 and not rec.near_misses


def test_bloom_view_with_batch_two_keeps_a_b_h_slope_table_as_a_bias():
    """With B = 2 the 3-D term's axis 0 is B·H: a constant of B·H slopes is no view of one
    slope per head, so the term is viewed as [B, H, 1, T] and kept as the bias (with the
    reason); the causal mask after the view is still proven."""
    graph, rec, log = fuse(_bloom(2))
    node = attn(graph)
    assert node.attrs["causal"] and node.attrs["alibi"] is None
    assert list(node.inputs[3].shape[:3]) == [2, 4, 1]
    assert "mask kept as an explicit bias" in log.why_not("attention/mask")


def test_bloom_alibi_broadcast_over_a_symbolic_batch_is_recognised():
    """BLOOM with a dynamic batch: one slope per head, expanded over B and viewed as
    [B·H, 1, T] for the bmm."""
    n = "4*batch"
    qkv = f"%q: f32[{n}, seq, 8], %k: f32[{n}, seq, 8], %v: f32[{n}, seq, 8]"
    text = f"""
graph main({qkv}, %batch_size: f32[batch]) {{
  const %slopes: f32[4, 1, 1] = {SLOPES_LIT}
  const %s: f32[] = 0.25
  %0: i64[seq] = arange() {{end=seq}}
  %h: f32[4, 1, seq] = mul(%slopes, %0)
  %h4: f32[1, 4, 1, seq] = reshape(%h) {{shape=[1, 4, 1, seq]}}
  %hb: f32[batch, 4, 1, seq] = expand(%h4) {{shape=[batch, 4, 1, seq]}}
  %alibi: f32[{n}, 1, seq] = reshape(%hb) {{shape=[{n}, 1, seq]}}
  %m0: f32[seq, seq] = full() {{shape=[seq, seq], value=-inf, dtype=f32}}
  %mask: f32[seq, seq] = triu(%m0) {{diagonal=1}}
  %kt: f32[{n}, 8, seq] = permute(%k) {{perm=[0, 2, 1]}}
  %qk: f32[{n}, seq, seq] = matmul(%q, %kt)
  %sc: f32[{n}, seq, seq] = mul(%qk, %s)
  %ab: f32[{n}, seq, seq] = add(%alibi, %sc)
  %s4: f32[batch, 4, seq, seq] = reshape(%ab) {{shape=[batch, 4, seq, seq]}}
  %mk: f32[batch, 4, seq, seq] = add(%s4, %mask)
  %p4: f32[batch, 4, seq, seq] = softmax(%mk) {{axis=3}}
  %p3: f32[{n}, seq, seq] = reshape(%p4) {{shape=[{n}, seq, seq]}}
  %o: f32[{n}, seq, 8] = matmul(%p3, %v)
  return %o
}}"""
    graph, rec, _ = fuse(text)
    node = attn(graph)
    assert node.attrs["causal"] and node.attrs["alibi"] == tuple(SLOPES)
    assert len(node.inputs) == 3 and not rec.near_misses


def test_viewed_scores_used_elsewhere_block_the_rewrite():
    text = _bloom(1).replace("  return %o\n", "  %r: f32[1, 4, seq, 1] = reduce_max(%s4) "
                             "{axes=[3], keepdim}\n  return %o, %r\n")
    _refused(text, "has another user", "attention/sdpa-view")


def test_view_that_is_no_head_split_is_refused():
    _refused(_bloom(1, view="4, seq, 1, seq", probs="4, seq, seq", mask=False),
             "not [B·H, S, T] -> [B, H, S, T]", "attention/sdpa-view")


def test_probabilities_viewed_without_a_scores_view_are_refused():
    """4-D scores whose probabilities alone are viewed as [B·H, S, T] for a 3-D value."""
    _refused("""
graph main(%q: f32[1, 4, seq, 8], %k: f32[1, 4, seq, 8], %v: f32[4, seq, 8]) {
  %kt: f32[1, 4, 8, seq] = permute(%k) {perm=[0, 1, 3, 2]}
  %qk: f32[1, 4, seq, seq] = matmul(%q, %kt)
  %p4: f32[1, 4, seq, seq] = softmax(%qk) {axis=3}
  %p3: f32[4, seq, seq] = reshape(%p4) {shape=[4, seq, seq]}
  %o: f32[4, seq, 8] = matmul(%p3, %v)
  return %o
}""", "not viewed as [B, H, S, T] and back", "attention/sdpa-view")


def _xglm(floor: str = "-3.4028234663852886e+38") -> str:
    """XGLM's eager attention: 3-D bmm scores viewed as [B, H, S, T], plus the causal mask,
    clamped with maximum(x, floor), viewed back to [B·H, S, T] for a 3-D softmax and bmm."""
    return f"""
graph main(%q: f32[4, seq, 8], %k: f32[4, seq, 8], %v: f32[4, seq, 8]) {{
  const %floor: f32[] = {floor}
  %m0: f32[seq, seq] = full() {{shape=[seq, seq], value=-3.4028234663852886e+38, dtype=f32}}
  %mask: f32[seq, seq] = triu(%m0) {{diagonal=1}}
  %kt: f32[4, 8, seq] = permute(%k) {{perm=[0, 2, 1]}}
  %qk: f32[4, seq, seq] = matmul(%q, %kt)
  %s4: f32[1, 4, seq, seq] = reshape(%qk) {{shape=[1, 4, seq, seq]}}
  %mk: f32[1, 4, seq, seq] = add(%s4, %mask)
  %cl: f32[1, 4, seq, seq] = maximum(%mk, %floor)
  %s3: f32[4, seq, seq] = reshape(%cl) {{shape=[4, seq, seq]}}
  %p3: f32[4, seq, seq] = softmax(%s3) {{axis=2}}
  %o: f32[4, seq, 8] = matmul(%p3, %v)
  return %o
}}"""


def test_xglm_clamped_scores_viewed_back_before_the_softmax_fuse():
    graph, rec, _ = fuse(_xglm())
    assert_graph(graph, """
graph main(%q: f32[4, seq, 8], %k: f32[4, seq, 8], %v: f32[4, seq, 8]) {
  %0: f32[1, 4, seq, 8] = reshape(%q) {shape=[1, 4, seq, 8]}
  %1: f32[1, 4, seq, 8] = reshape(%k) {shape=[1, 4, seq, 8]}
  %2: f32[1, 4, seq, 8] = reshape(%v) {shape=[1, 4, seq, 8]}
  %3: f32[1, 4, seq, 8] = attention(%0, %1, %2) {causal, scale=1.0}
  %4: f32[4, seq, 8] = reshape(%3) {shape=[4, seq, 8]}
  return %4
}""")
    assert rec.matched("attention/sdpa-view-back") == 1 and not rec.near_misses


def test_xglm_numerics_and_a_clamp_above_finfo_min_is_refused():
    from transfuse.ir.interpret import interpret
    from transfuse.ir.parser import parse_graph

    text = _xglm()
    q, k, v = (torch.randn(4, 6, 8) for _ in range(3))
    want = interpret(parse_graph(text), [q, k, v])[0]
    graph, _, _ = fuse(text)
    torch.testing.assert_close(interpret(graph, [q, k, v])[0], want, rtol=1e-6, atol=1e-6)
    # a clamp at -1e4 would lift unmasked scores below -1e4: not a mask step
    graph, rec, log = fuse(_xglm("-10000.0"), dce=False)
    assert rec.matched("attention/sdpa-view-back") == 0
    assert "only a clamp at the dtype's lowest value" in log.why_not("attention/sdpa-view-back")


# -- the frontend's attention with a mask folded into its bias (T5 through SDPA) ----------------

def test_mask_folded_into_an_sdpa_bias_by_where_is_split():
    """T5's decoder hands SDPA ``where(causal, position_bias, min)``: causal becomes the
    attr and the position bias, unchanged, the bias."""
    graph, rec, _ = fuse(f"""
graph main({QKV}, %pb: f32[1, 4, seq, seq]) {{
  const %low: f32[] = -3.4028235e+38
  %0: bool[seq, seq] = full() {{shape=[seq, seq], value=1.0, dtype=bool}}
  %1: bool[seq, seq] = tril(%0)
  %2: f32[1, 4, seq, seq] = where(%1, %pb, %low)
  %3: f32[batch, 4, seq, 8] = attention(%q, %k, %v, %2) {{scale=1.0}}
  return %3
}}""")
    assert_graph(graph, f"""
graph main({QKV}, %pb: f32[1, 4, seq, seq]) {{
  %0: f32[batch, 4, seq, 8] = attention(%q, %k, %v, %pb) {{causal, scale=1.0}}
  return %0
}}""")
    assert rec.matched("attention/sdpa-mask") == 1


def test_unproven_mask_folded_into_an_sdpa_bias_is_left_alone():
    text = f"""
graph main({QKV}, %pb: f32[1, 4, seq, seq], %keep: bool[batch, 1, seq, seq]) {{
  const %low: f32[] = -3.4028235e+38
  %0: f32[batch, 4, seq, seq] = where(%keep, %pb, %low)
  %1: f32[batch, 4, seq, 8] = attention(%q, %k, %v, %0) {{scale=1.0}}
  return %1
}}"""
    graph, rec, log = fuse(text, dce=False)
    assert_graph(graph, text)
    assert "mask kept as an explicit bias" in log.why_not("attention/mask")
