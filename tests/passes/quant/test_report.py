"""The quantization report: contents, JSON round trips (alone and inside the pass log), the
readable table, and quant_report() when nothing was quantized."""

import json
import math

import pytest
import torch

from transfuse.errors import PassError
from transfuse.ir.parser import parse_graph
from transfuse.passes.log import PassLog, PassRecord
from transfuse.passes.manager import run_passes
from transfuse.passes.quant.report import LayerReport, QuantReport

PASS = "quant.quantize-weights"

GRAPH = """
graph main(%ids: i64[batch, seq]) {
  const %emb: f32[50, 32]
  const %nw: f32[32]
  const %w1: f32[64, 32]
  const %w2: f32[32, 64]
  const %head: f32[50, 32]
  %e: f32[batch, seq, 32] = embedding(%emb, %ids)  # @embed
  %h: f32[batch, seq, 32] = rms_norm(%e, %nw)  # @layers.0.norm
  %u: f32[batch, seq, 64] = linear(%h, %w1, _) {activation="silu"}  # @layers.0.mlp.up_proj
  %d: f32[batch, seq, 32] = linear(%u, %w2, _)  # @layers.0.mlp.down_proj
  %y: f32[batch, seq, 32] = add(%e, %d)
  %l: f32[batch, seq, 50] = linear(%y, %head, _)  # @lm_head
  return %l
}"""


def _ids(n=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randint(0, 50, (2, 10), generator=gen)] for _ in range(n)]


def _run(quantize, **options):
    graph = parse_graph(GRAPH)
    log = run_passes(graph, [PASS], options={"quantize": quantize, "progress": False,
                                              **options})
    return graph, log


def test_report_contents_and_end_to_end_numbers():
    graph, log = _run({"scheme": "int4-gptq", "keep_float": ["*.down_proj"]},
                      calibration=_ids(), evaluation=_ids(1, seed=1))
    r = log.quant_report()
    assert r.scheme == "int4-gptq" and "keep_float=['*.down_proj']" in r.config
    up, down, head = r.layers
    assert (up.name, up.op, up.scheme, up.shape, up.bits, up.group, up.symmetric) == \
        ("layers.0.mlp.up_proj", "qlinear", "int4-gptq", [64, 32], 4, 32, False)
    assert up.sqnr_on == "output" and 10 < up.sqnr_db < 40
    assert up.quant_bytes == 64 * 16 + 2 * 64 * 4 and up.float_bytes == 64 * 32 * 4
    assert down.op == "linear" and down.scheme == "float" and down.bits is None
    assert down.kept_float == "keep_float pattern '*.down_proj'" and down.quant_bytes == \
        down.float_bytes
    assert head.scheme == "int8-weight" and head.notes[0] == "LM head"
    assert r.quantized == [up, head] and r.kept_float == [down]
    assert r.calibration_batches == 2 and r.calibration_rows == 40
    assert any("which int4-gptq, int8-weight fitted: optimistic" in n for n in r.notes)
    assert r.measured_on == "the evaluation inputs (1 batch)" and r.tokens == 20
    assert r.kl >= 0 and 0 <= r.top1 <= 1
    assert r.ppl_float > 1 and r.ppl_quant > 1
    assert r.ppl_increase == pytest.approx(r.ppl_quant / r.ppl_float - 1)
    assert r.seconds >= r.calibrate_seconds + r.evaluate_seconds > 0
    assert r.float_bytes - r.quant_bytes == (64 * 32 * 4 - up.quant_bytes) + \
        (50 * 32 * 4 - head.quant_bytes)
    assert graph.meta["quant"] == r.to_json()
    with pytest.raises(PassError, match="no layer 'nope'.*layers.0.mlp.up_proj"):
        r.layer("nope")


def test_json_round_trips_alone_and_in_the_pass_log():
    _, log = _run("int8-weight", calibration=_ids())
    r = log.quant_report()
    text = json.dumps(r.to_json(), allow_nan=False)
    assert QuantReport.from_json(json.loads(text)) == r
    again = PassLog.from_json(json.dumps(log.to_json(), allow_nan=False))
    assert again.quant_report() == r
    # a record written before records had data still loads
    old = log.records[0].to_json()
    del old["data"]
    assert PassRecord.from_json(old).data == {}


def test_non_finite_numbers_survive_strict_json():
    r = QuantReport("int8-weight", layers=[LayerReport("a", "qlinear", "int8-weight", [2, 2],
                                                       sqnr_db=math.inf)], kl=math.nan)
    d = json.loads(json.dumps(r.to_json(), allow_nan=False))
    back = QuantReport.from_json(d)
    assert back.layers[0].sqnr_db == math.inf and math.isnan(back.kl)
    d["version"] = 99
    with pytest.raises(PassError, match="unknown quantization report version"):
        QuantReport.from_json(d)


def test_the_table_reads():
    _, log = _run({"scheme": "int4-weight", "keep_float": ["*.down_proj"]},
                  calibration=_ids())
    text = str(log.quant_report())
    lines = text.splitlines()
    assert lines[0] == "transfuse quantization report"
    assert lines[1].split() == ["layer", "op", "scheme", "N×K", "bits", "group", "sym",
                                "SQNR", "dB", "KiB", "note"]
    row = next(line for line in lines if line.startswith("layers.0.mlp.up_proj"))
    assert row.split()[:8] == ["layers.0.mlp.up_proj", "qlinear", "int4-weight", "64×32", "4",
                               "32", "asym", row.split()[7]]
    assert "8.0→1.5" in row  # KiB before → after
    assert "float: keep_float pattern '*.down_proj'" in text
    assert "quantized 2 of 3 layers (int4-weight, keep_float=['*.down_proj']); 1 kept float" in \
        text
    assert "calibration: 2 batches, 40 rows" in text
    assert "end to end on the calibration inputs (2 batches): KL(float||quant)" in text
    assert "perplexity" in text
    # the same lines are notes of the pass record
    assert any(n.startswith("quantized 2 of 3 layers") for n in log.records[0].notes)


def test_weight_sqnr_is_marked_without_calibration():
    _, log = _run("int8-weight", evaluation=False)
    r = log.quant_report()
    assert all(lr.sqnr_on == "weight" for lr in r.layers)
    assert r.measured_on == "not measured (evaluation=False)" and r.kl is None
    text = str(r)
    assert "SQNR marked w: of the weight alone" in text and "end to end: not measured" in text


def test_no_report_without_quantization_or_after_a_failed_pass():
    _, log = _run(None)
    assert log.quant_report() is None
    graph = parse_graph(GRAPH)
    log = run_passes(graph, [PASS], verify=True,
                     options={"quantize": "int4-awq", "progress": False})  # no calibration
    assert log.records[0].status == "failed" and "calibration=" in log.records[0].error
    assert log.quant_report() is None


def test_an_encoder_output_is_compared_by_cosine_only():
    encoder = """
graph main(%x: f32[batch, seq, 32]) {
  const %w1: f32[64, 32]
  const %w2: f32[32, 64]
  const %nw: f32[32]
  const %nb: f32[32]
  %u: f32[batch, seq, 64] = linear(%x, %w1, _) {activation="gelu"}  # @layer.0.intermediate
  %d: f32[batch, seq, 32] = linear(%u, %w2, _)  # @layer.0.output
  %h: f32[batch, seq, 32] = layer_norm(%d, %nw, %nb)  # @layer.0.norm
  return %h
}"""
    gen = torch.Generator().manual_seed(0)
    ev = [[torch.randn(2, 6, 32, generator=gen)]]
    graph = parse_graph(encoder)
    log = run_passes(graph, [PASS], options={"quantize": {"scheme": "w8a8", "smoothquant": 0},
                                              "evaluation": ev, "progress": False})
    r = log.quant_report()
    assert r.kl is None and r.top1 is None and r.ppl_float is None
    assert 0.999 < r.cosine <= 1.0 and r.tokens == 12
    assert "cosine of the first output" in r.summary() and "no KL / top-1 / perplexity" in \
        r.summary()
    assert all("LM head" not in lr.notes for lr in r.layers)
