"""attention.remove-repeat-kv: repeated K/V heads feeding ``attention`` become ``kv_heads``
(HF repeat_kv, repeat_interleave, index_select, a single-head expand); tiled repeats and
half-repeated pairs are near misses."""

from __future__ import annotations

import pytest
from pass_helpers import apply, assert_graph

from transfuse.ir.parser import parse_graph
from transfuse.passes.attention.gqa import RemoveRepeatKv
from transfuse.passes.manager import run_passes

PASS = RemoveRepeatKv.name
HEAD = ("graph main(%q: f32[batch, 4, seq, 8], %k: f32[batch, 2, seq, 8], "
        "%v: f32[batch, 2, seq, 8]) {")
FUSED = f"""
{HEAD}
  %0: f32[batch, 4, seq, 8] = attention(%q, %k, %v) {{causal, kv_heads=2, scale=0.25}}
  return %0
}}"""


def _repeat_kv(x: str, i: int) -> str:
    """HF repeat_kv: x[:, :, None].expand(B, 2, 2, T, D).reshape(B, 4, T, D)."""
    return f"""
  %{x}{i}: f32[batch, 2, 1, seq, 8] = reshape(%{x}) {{shape=[batch, 2, 1, seq, 8]}}
  %{x}{i + 1}: f32[batch, 2, 2, seq, 8] = expand(%{x}{i}) {{shape=[batch, 2, 2, seq, 8]}}
  %{x}{i + 2}: f32[batch, 4, seq, 8] = reshape(%{x}{i + 1}) {{shape=[batch, 4, seq, 8]}}"""


def test_hf_repeat_kv_is_removed():
    graph, rec = apply(f"""
{HEAD}{_repeat_kv("k", 0)}{_repeat_kv("v", 0)}
  %0: f32[batch, 4, seq, 8] = attention(%q, %k2, %v2) {{causal, scale=0.25}}
  return %0
}}""", PASS)
    assert_graph(graph, FUSED)
    assert rec.matched("attention/repeat-kv") == 1
    assert graph.find("attention")[0].meta["origin"] == "attention.remove-repeat-kv/attention/repeat-kv"


REPEAT_INTERLEAVE = ('torch_fallback(%{x}) {{target="aten::repeat_interleave.self_int", '
                     'args="{{\\"args\\": [{{\\"$in\\": 0}}, 2, 1], \\"kwargs\\": {{}}}}"}}')


@pytest.mark.parametrize("form", ["repeat_interleave", "index_select"])
def test_repeat_interleave_and_index_select(form):
    def rep(x):
        if form == "index_select":
            return f"index_select(%{x}, %idx) {{axis=1}}"
        return REPEAT_INTERLEAVE.format(x=x)

    idx = "\n  const %idx: i64[4] = [0, 0, 1, 1]" if form == "index_select" else ""
    graph, rec = apply(f"""
{HEAD}{idx}
  %0: f32[batch, 4, seq, 8] = {rep("k")}
  %1: f32[batch, 4, seq, 8] = {rep("v")}
  %2: f32[batch, 4, seq, 8] = attention(%q, %0, %1) {{causal, scale=0.25}}
  return %2
}}""", PASS)
    assert_graph(graph, FUSED.replace(HEAD, HEAD + idx))  # the constant goes with DCE
    assert rec.matched("attention/repeat-kv") == 1


def test_multi_query_expand():
    graph, _ = apply("""
graph main(%q: f32[batch, 4, seq, 8], %k: f32[batch, 1, seq, 8], %v: f32[batch, 1, seq, 8]) {
  %0: f32[batch, 4, seq, 8] = expand(%k) {shape=[batch, 4, seq, 8]}
  %1: f32[batch, 4, seq, 8] = expand(%v) {shape=[batch, 4, seq, 8]}
  %2: f32[batch, 4, seq, 8] = attention(%q, %0, %1) {scale=0.25}
  return %2
}""", PASS)
    assert_graph(graph, """
graph main(%q: f32[batch, 4, seq, 8], %k: f32[batch, 1, seq, 8], %v: f32[batch, 1, seq, 8]) {
  %0: f32[batch, 4, seq, 8] = attention(%q, %k, %v) {kv_heads=1, scale=0.25}
  return %0
}""")


def test_repeat_without_the_unsqueeze_reshape_gets_one():
    """expand starts from a [B, Hkv, 1, T, D] value that is no reshape of [B, Hkv, T, D]."""
    graph, _ = apply("""
graph main(%q: f32[batch, 4, seq, 8], %k: f32[batch, 2, 1, seq, 8], %v: f32[batch, 2, 1, seq, 8]) {
  %0: f32[batch, 2, 2, seq, 8] = expand(%k) {shape=[batch, 2, 2, seq, 8]}
  %1: f32[batch, 4, seq, 8] = reshape(%0) {shape=[batch, 4, seq, 8]}
  %2: f32[batch, 2, 2, seq, 8] = expand(%v) {shape=[batch, 2, 2, seq, 8]}
  %3: f32[batch, 4, seq, 8] = reshape(%2) {shape=[batch, 4, seq, 8]}
  %4: f32[batch, 4, seq, 8] = attention(%q, %1, %3) {scale=0.25}
  return %4
}""", PASS)
    assert_graph(graph, """
graph main(%q: f32[batch, 4, seq, 8], %k: f32[batch, 2, 1, seq, 8], %v: f32[batch, 2, 1, seq, 8]) {
  %0: f32[batch, 2, seq, 8] = reshape(%k) {shape=[batch, 2, seq, 8]}
  %1: f32[batch, 2, seq, 8] = reshape(%v) {shape=[batch, 2, seq, 8]}
  %2: f32[batch, 4, seq, 8] = attention(%q, %0, %1) {kv_heads=2, scale=0.25}
  return %2
}""")


def _refused(text: str, why: str) -> None:
    graph = parse_graph(text)
    log = run_passes(graph, [PASS])
    assert_graph(graph, text)
    assert why in log.why_not("attention/repeat-kv"), log.why_not("attention/repeat-kv")


def test_tiled_repeat_is_not_gqa():
    """expand to [B, n, Hkv, T, D]: query head h reads kv head h % Hkv, not h // n."""
    _refused(f"""
{HEAD}
  %0: f32[batch, 1, 2, seq, 8] = reshape(%k) {{shape=[batch, 1, 2, seq, 8]}}
  %1: f32[batch, 2, 2, seq, 8] = expand(%0) {{shape=[batch, 2, 2, seq, 8]}}
  %2: f32[batch, 4, seq, 8] = reshape(%1) {{shape=[batch, 4, seq, 8]}}
  %3: f32[batch, 1, 2, seq, 8] = reshape(%v) {{shape=[batch, 1, 2, seq, 8]}}
  %4: f32[batch, 2, 2, seq, 8] = expand(%3) {{shape=[batch, 2, 2, seq, 8]}}
  %5: f32[batch, 4, seq, 8] = reshape(%4) {{shape=[batch, 4, seq, 8]}}
  %6: f32[batch, 4, seq, 8] = attention(%q, %2, %5) {{scale=0.25}}
  return %6
}}""", "tiles")


def test_repeated_k_with_unrepeated_v():
    _refused(f"""
graph main(%q: f32[batch, 4, seq, 8], %k: f32[batch, 2, seq, 8], %v: f32[batch, 4, seq, 8]) {{
  {_repeat_kv("k", 0)}
  %0: f32[batch, 4, seq, 8] = attention(%q, %k2, %v) {{scale=0.25}}
  return %0
}}""", "k is a repeat of fewer kv heads but v is not")


def test_index_select_with_another_order():
    _refused(f"""
{HEAD}
  const %idx: i64[4] = [0, 1, 0, 1]
  %0: f32[batch, 4, seq, 8] = index_select(%k, %idx) {{axis=1}}
  %1: f32[batch, 4, seq, 8] = index_select(%v, %idx) {{axis=1}}
  %2: f32[batch, 4, seq, 8] = attention(%q, %0, %1) {{scale=0.25}}
  return %2
}}""", "selects kv heads [0, 1, 0, 1]")
