"""Attention-mask analysis through the IR ``index`` op and ``concat``: the mask a dynamo ONNX
export of a Hugging Face decoder builds without an attention mask (causal and "same packed
sequence", the sequence ids from ``cumsum(diff(positions) != 1)`` with the diff written as a
concat and two slices) is proven causal; indexing on non-leading, non-consecutive dims keeps
the right dims; parts of a concat that are no one index expression stay data.

Glossary: B batch, S = T sequence length; i query index, j key index.
"""

from __future__ import annotations

import pytest
import torch

from transfuse.ir.interpret import interpret
from transfuse.ir.parser import parse_graph
from transfuse.ir.types import sym
from transfuse.ir.verify import verify
from transfuse.passes.attention.masks import MaskFacts, analyze_bool_mask

SEQ = sym("seq")

# HF's sdpa mask of a dynamo export with no attention_mask input: keep (b, i, j) when
# j <= i and seq_id[b, i] == seq_id[b, j], with positions p = arange(seq) per row and
# seq_id = cumsum(diff(p, prepend=p[:, :1] - 1) != 1); the components of each GatherND
# are arange(batch) [B, 1, 1, 1] and arange(seq) as [1, 1, S, 1] (query) or [1, 1, 1, T] (key)
PACKED = """
graph main(%ids: i64[batch, seq]) {
  const %one: i64[] = 1
  %a: i64[seq] = arange() {end=seq}
  %a2: i64[1, seq] = reshape(%a) {shape=[1, seq]}
  %p: i64[batch, seq] = expand(%a2) {shape=[batch, seq]}
  %first: i64[batch, 1] = slice(%p) {axis=1, end=1}
  %prev: i64[batch, 1] = sub(%first, %one)
  %cat: i64[batch, seq + 1] = concat(%prev, %p) {axis=1}
  %lo: i64[batch, seq] = slice(%cat) {axis=1, end=seq}
  %hi: i64[batch, seq] = slice(%cat) {axis=1, start=1, end=seq + 1}
  %d: i64[batch, seq] = sub(%hi, %lo)
  %step: bool[batch, seq] = eq(%d, %one)
  %new: bool[batch, seq] = logical_not(%step)
  %newi: i64[batch, seq] = cast(%new) {dtype=i64}
  %sid: i64[batch, seq] = cumsum(%newi) {axis=1, dtype=i64}
  %b: i64[batch] = arange() {end=batch}
  %b4: i64[batch, 1, 1, 1] = reshape(%b) {shape=[batch, 1, 1, 1]}
  %q4: i64[1, 1, seq, 1] = reshape(%a) {shape=[1, 1, seq, 1]}
  %k4: i64[1, 1, 1, seq] = reshape(%a) {shape=[1, 1, 1, seq]}
  %bq: i64[batch, 1, seq, 1] = expand(%b4) {shape=[batch, 1, seq, 1]}
  %qq: i64[batch, 1, seq, 1] = expand(%q4) {shape=[batch, 1, seq, 1]}
  %bk: i64[batch, 1, 1, seq] = expand(%b4) {shape=[batch, 1, 1, seq]}
  %kk: i64[batch, 1, 1, seq] = expand(%k4) {shape=[batch, 1, 1, seq]}
  %pi: i64[batch, 1, seq, 1] = index(%p, %bq, %qq) {axes=[0, 1]}
  %pj: i64[batch, 1, 1, seq] = index(%p, %bk, %kk) {axes=[0, 1]}
  %causal: bool[batch, 1, seq, seq] = le(%pj, %pi)
  %si: i64[batch, 1, seq, 1] = index(%sid, %bq, %qq) {axes=[0, 1]}
  %sj: i64[batch, 1, 1, seq] = index(%sid, %bk, %kk) {axes=[0, 1]}
  %same: bool[batch, 1, seq, seq] = eq(%si, %sj)
  %keep: bool[batch, 1, seq, seq] = logical_and(%causal, %same)
  return %keep
}"""


def _mask(text: str):
    graph = parse_graph(text)
    verify(graph)
    return graph.outputs[0]


def _values(mask, batch: int, seq: int) -> torch.Tensor:
    (out,) = interpret(mask.graph, [torch.zeros(batch, seq, dtype=torch.int64)])
    return out


def test_exported_packed_sequence_mask_is_causal():
    mask = _mask(PACKED)
    facts = analyze_bool_mask(mask, SEQ, SEQ, keep_value=True)
    assert facts == MaskFacts(True, None, None, None)
    for batch, seq in ((2, 5), (1, 9)):
        want = torch.ones(seq, seq, dtype=torch.bool).tril().expand(batch, 1, seq, seq)
        assert torch.equal(_values(mask, batch, seq), want)


def test_concat_of_parts_that_are_no_one_expression_stays_data():
    """The first position appended at the end instead of prepended: the step into the last
    token is 1 - seq, so the last token starts a packed sequence of its own and sees only
    itself. The concat is no one index expression: not proven causal, and it is not."""
    text = PACKED.replace("%cat: i64[batch, seq + 1] = concat(%prev, %p)",
                          "%cat: i64[batch, seq + 1] = concat(%p, %first)")
    mask = _mask(text)
    facts = analyze_bool_mask(mask, SEQ, SEQ, keep_value=True)
    assert not facts.causal and "%sid = cumsum" in facts.reason, facts.reason
    got = _values(mask, 1, 5)[0, 0]
    assert got[-1].tolist() == [False] * 4 + [True]
    assert torch.equal(got[:-1], torch.ones(4, 5, dtype=torch.bool).tril())


# a causal keep mask [S, 1, T] indexed on dims 0 and 2 (not consecutive: I = [S, T] first)
APART = """
graph main(%ids: i64[batch, seq]) {
  %a: i64[seq] = arange() {end=seq}
  %i3: i64[seq, 1, 1] = reshape(%a) {shape=[seq, 1, 1]}
  %j3: i64[1, 1, seq] = reshape(%a) {shape=[1, 1, seq]}
  %k3: bool[seq, 1, seq] = le(%j3, %i3)
  %col: i64[seq, 1] = reshape(%a) {shape=[seq, 1]}
  %row: i64[1, seq] = reshape(%a) {shape=[1, seq]}
  %x: bool[seq, seq, 1] = index(%k3, FIRST, SECOND) {axes=[0, 2]}
  %keep: bool[seq, seq] = reshape(%x) {shape=[seq, seq]}
  return %keep
}"""


@pytest.mark.parametrize("first, second, expect", [
    ("%col", "%row", MaskFacts(True, None, None, None)),
    ("%row", "%col", MaskFacts(False, 1, None, None)),  # keys j < i masked: the transpose
])
def test_index_on_dims_apart_puts_the_index_shape_first(first, second, expect):
    """x[i, :, j] with i varying along the result's dim 0 and j along dim 1 reads the mask
    as it is (causal); with the components swapped it reads the transpose (j >= i kept)."""
    mask = _mask(APART.replace("FIRST", first).replace("SECOND", second))
    assert analyze_bool_mask(mask, SEQ, SEQ, keep_value=True) == expect
    want = torch.ones(6, 6, dtype=torch.bool).tril()
    assert torch.equal(_values(mask, 1, 6), want if expect.causal else want.T)
