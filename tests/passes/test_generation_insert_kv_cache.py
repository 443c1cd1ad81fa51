"""generation.insert-kv-cache: text graphs in, the cached step out; every refusal has a test.

A one-layer LM whose causal mask is built from ``position_ids`` (as Hugging Face's
packed-sequence mask is) becomes a step with the GEN_DESIGN.md inputs; run with the
reference interpreter on one sequence, its logits at ``logit_rows`` equal the original
graph's rows. Refused: a non-causal attention, a leftover softmax, a bias that reads
another input, a position-only bias that is not a causal band, a graph without
``position_ids``, positions computed by an ``arange`` over the tokens.
"""

from __future__ import annotations

import pytest
import torch

from transfuse.errors import PassError
from transfuse.ir.interpret import interpret
from transfuse.ir.parser import parse_graph
from transfuse.ir.verify import verify
from transfuse.passes.manager import run_passes

PASS = "generation.insert-kv-cache"
GEO = {"max_seq_len": 16, "max_batch": 2, "kv": "contiguous"}

LM = """
graph lm(%input_ids: i64[1, seq], %position_ids: i64[1, seq]) {
  const %emb: f32[16, 8]
  const %wpe: f32[16, 8]
  const %ln_w: f32[8]
  const %lm_head: f32[16, 8]
  const %zero: f32[] = 0.0
  const %masked: f32[] = -1000000000.0
  const %three: i64[] = 3
  %e: f32[1, seq, 8] = embedding(%emb, %input_ids)
EXTRA_HEAD
  %p: f32[1, seq, 8] = embedding(%wpe, POSITIONS)
  %h: f32[1, seq, 8] = add(%e, %p)
  %x: f32[1, seq, 2, 4] = reshape(%h) {shape=[1, seq, 2, 4]}
  %q: f32[1, 2, seq, 4] = permute(%x) {perm=[0, 2, 1, 3]}
  %pq: i64[1, 1, seq, 1] = reshape(%position_ids) {shape=[1, 1, seq, 1]}
  %pk: i64[1, 1, 1, seq] = reshape(%position_ids) {shape=[1, 1, 1, seq]}
EXTRA_MASK
  %keep: bool[1, 1, seq, seq] = KEEP
  %bias: f32[1, 1, seq, seq] = where(%keep, %zero, %masked)
  %a: f32[1, 2, seq, 4] = ATTENTION
  %o: f32[1, seq, 2, 4] = permute(%a) {perm=[0, 2, 1, 3]}
  %r: f32[1, seq, 8] = reshape(%o) {shape=[1, seq, 8]}
  %s: f32[1, seq, 8] = add(%h, %r)
  %n: f32[1, seq, 8] = rms_norm(%s, %ln_w)
  %logits: f32[1, seq, 16] = linear(%n, %lm_head, _)
  return %logits
}
"""


BASE = LM.replace("EXTRA_HEAD\n", "").replace("EXTRA_MASK\n", "")


def lm(positions="%position_ids", keep="le(%pk, %pq)",
       attention="attention(%q, %q, %q, %bias) {scale=0.5}", head="", mask=""):
    return parse_graph(LM.replace("POSITIONS", positions).replace("KEEP", keep)
                       .replace("ATTENTION", attention).replace("EXTRA_HEAD", head)
                       .replace("EXTRA_MASK", mask))


def run(graph, geo=GEO):
    return run_passes(graph, [PASS, "cleanup.eliminate-dead-code"],
                      options={"generation": geo}).records[0]


def test_rewrites_to_cached_step_and_matches_one_sequence():
    graph = lm()
    before = graph.clone()
    rec = run(graph)
    verify(graph)
    assert [v.name for v in graph.inputs] == [
        "input_ids", "position_ids", "seq_of_token", "seq_lens", "cache_table", "logit_rows",
        "k_cache_0", "v_cache_0"]
    assert str(graph.inputs[6].type) == "f32[2, 16, 2, 4]"
    assert [str(v.type) for v in graph.outputs] == ["f32[rows, 16]"]
    hist = graph.op_histogram()
    assert hist["cached_attention"] == 1 and not hist["attention"]
    assert not hist["where"] and not hist["le"]  # the mask is gone
    assert graph.meta["generation"]["layers"] == 1
    assert rec.status == "changed"
    assert rec.rule_stats("generation/cached-attention")["matched"] == 1
    assert rec.rule_stats("generation/logit-rows")["matched"] == 1
    # numerics: one sequence of 6 tokens in slot 1, logits for rows 5 and 2
    ids, pos = torch.randint(0, 16, (1, 6)), torch.arange(6)[None]
    want = interpret(before, [ids, pos])[0][0, [5, 2]]
    caches = [torch.zeros(2, 16, 2, 4), torch.zeros(2, 16, 2, 4)]
    got = interpret(graph, [ids, pos, torch.zeros(6, dtype=torch.long), torch.tensor([6]),
                            torch.tensor([1]), torch.tensor([5, 2]), *caches])[0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert caches[0][1, :6].abs().sum() > 0 and caches[0][0].abs().sum() == 0


def test_window_band_and_paged_geometry():
    graph = lm(keep="logical_and(%causal, %near)", mask=(
        "  %causal: bool[1, 1, seq, seq] = le(%pk, %pq)\n"
        "  %pq3: i64[1, 1, seq, 1] = sub(%pq, %three)\n"
        "  %near: bool[1, 1, seq, seq] = gt(%pk, %pq3)"))
    run(graph, {**GEO, "kv": "paged", "block_size": 4})
    (node,) = graph.find("cached_attention")
    assert node.attrs["window"] == 3 and node.attrs["paged"] and node.attrs["block_size"] == 4
    assert str(graph.inputs[4].type) == "i64[seqs, table_blocks]"
    assert str(graph.inputs[6].type) == "f32[8, 4, 2, 4]"  # 2 slots x 16 / 4 blocks


def test_max_step_tokens_is_recorded_and_checked():
    graph = lm()
    run(graph)
    assert graph.meta["generation"]["max_step_tokens"] == 32  # max_batch x max_seq_len
    graph = lm()
    rec = run(graph, {**GEO, "max_step_tokens": 5, "max_step_tokens_reason": "its table"})
    assert graph.meta["generation"]["max_step_tokens"] == 5
    assert "max_step_tokens_reason" not in graph.meta["generation"]
    assert any("at most 5 tokens" in n and "why: its table" in n for n in rec.notes), rec.notes
    for bad in (1, 33, True, "8"):
        with pytest.raises(PassError, match=f"max_step_tokens={bad!r}: expected an int from "
                                            r"max_batch \(2"):
            run(lm(), {**GEO, "max_step_tokens": bad})


def test_the_band_is_checked_in_row_blocks(monkeypatch):
    """band_of checks the query rows in blocks (ROWS): a window and a violation found in a
    later block as in one."""
    from transfuse.passes.generation import position_mask

    monkeypatch.setattr(position_mask, "ROWS", 3)
    graph = lm(keep="logical_and(%causal, %near)", mask=(
        "  %causal: bool[1, 1, seq, seq] = le(%pk, %pq)\n"
        "  %pq3: i64[1, 1, seq, 1] = sub(%pq, %three)\n"
        "  %near: bool[1, 1, seq, seq] = gt(%pk, %pq3)"))
    run(graph)
    assert graph.find("cached_attention")[0].attrs["window"] == 3
    _refused(lm(keep="ge(%pk, %pq)"), "not causal")


def test_without_the_option_nothing_changes():
    graph = lm()
    rec = run_passes(graph, [PASS]).records[0]
    assert rec.status == "unchanged" and graph.find("attention")


def _refused(graph, match, geo=GEO):
    with pytest.raises(PassError, match=match) as info:
        run(graph, geo)
    rec = info.value.pass_log.records[-1]
    assert rec.status == "failed" and any(match in m.reason for m in rec.near_misses)


def test_refuses_non_causal_attention():
    _refused(lm(attention="attention(%q, %q, %q) {scale=0.5}"), "is not causal")


def test_refuses_leftover_softmax():
    graph = parse_graph(BASE.replace("POSITIONS", "%position_ids").replace("KEEP", "le(%pk, %pq)")
                        .replace("ATTENTION", "softmax(%q) {axis=2}"))  # over the tokens
    _refused(graph, "softmax over the tokens left")


def test_refuses_bias_that_is_not_a_causal_band():
    _refused(lm(keep="ge(%pk, %pq)"), "not causal")  # sees later keys


def test_refuses_bias_reading_another_input():
    text = BASE.replace("POSITIONS", "%position_ids").replace("KEEP", "le(%pk, %pq)").replace(
        "ATTENTION", "attention(%q, %q, %q, %bias) {scale=0.5}").replace(
        "%position_ids: i64[1, seq])", "%position_ids: i64[1, seq], %mask: f32[1, 1, seq, seq])"
    ).replace("%bias: f32[1, 1, seq, seq] = where(%keep, %zero, %masked)",
              "%b0: f32[1, 1, seq, seq] = where(%keep, %zero, %masked)\n"
              "  %bias: f32[1, 1, seq, seq] = add(%b0, %mask)")
    _refused(parse_graph(text), "graph inputs")


def test_refuses_positions_from_the_token_index():
    graph = lm(positions="%ar2", head=(
        "  %ar: i64[seq] = arange() {end=seq}\n"
        "  %ar2: i64[1, seq] = reshape(%ar) {shape=[1, seq]}"))
    _refused(graph, "arange over the token axis")


def test_refuses_a_mask_it_cannot_observe_over_every_position():
    _refused(lm(), "over 32768", {**GEO, "max_seq_len": 40000})


def test_one_mask_shared_by_two_layers_is_checked_once(monkeypatch):
    from transfuse.passes.generation import insert_kv_cache

    calls = []
    real = insert_kv_cache.band_of
    monkeypatch.setattr(insert_kv_cache, "band_of",
                        lambda *a: calls.append(a) or real(*a))
    graph = lm(attention="attention(%q, %q, %q, %bias) {scale=0.5}")
    text = str(graph).replace(
        "%o: f32[1, seq, 2, 4] = permute(%a)",
        "%a2: f32[1, 2, seq, 4] = attention(%a, %q, %q, %bias) {scale=0.5}\n"
        "  %o: f32[1, seq, 2, 4] = permute(%a2)")
    graph = parse_graph(text)
    run(graph)
    assert len(graph.find("cached_attention")) == 2 and len(calls) == 1
    assert [v.name for v in graph.inputs][6:] == ["k_cache_0", "v_cache_0", "k_cache_1",
                                                  "v_cache_1"]
