"""quant.quantize-weights: linears -> qlinear / qmatmul on text graphs and the tiny models;
numerics against the float graph, the report, and every refusal leaving the graph as it was."""

import math

import pytest
import torch

from transfuse.errors import InputError, PassError
from transfuse.ir.interpret import interpret
from transfuse.ir.parser import parse_graph
from transfuse.ir.printer import print_graph
from transfuse.ir.quant import sqnr_db
from transfuse.ir.verify import verify
from transfuse.passes.manager import run_passes, run_pipeline

PASS = "quant.quantize-weights"

MLP = """
graph main(%x: f32[batch, seq, 64]) {
  const %nw: f32[64]
  const %wup: f32[128, 64]
  const %bup: f32[128]
  const %wdown: f32[64, 128]
  const %whead: f32[96, 64]
  %h: f32[batch, seq, 64] = rms_norm(%x, %nw)  # @layers.0.norm
  %u: f32[batch, seq, 128] = linear(%h, %wup, %bup) {activation="gelu"}  # @layers.0.mlp.up_proj
  %d: f32[batch, seq, 64] = linear(%u, %wdown, _)  # @layers.0.mlp.down_proj
  %y: f32[batch, seq, 64] = add(%x, %d)
  %l: f32[batch, seq, 96] = linear(%y, %whead, _)  # @lm_head
  return %l
}"""


class FakeTarget:
    """A target with fixed answers to the quantization questions."""

    name = "fake"

    def __init__(self, act=("token", "tensor"), refuse=None):
        self.qmatmul_act_quant = act
        self.refuse = refuse or (lambda qtype, op: None)
        self.asked = []

    def quant_unsupported(self, qtype, op):
        self.asked.append((str(qtype), op))
        return self.refuse(qtype, op)


def batches(n=3, rows=8, seed=0, k=64):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, rows, k, generator=gen)] for _ in range(n)]


def quantize(text_or_graph, quantize, **options):
    graph = parse_graph(text_or_graph) if isinstance(text_or_graph, str) else text_or_graph
    before = graph.clone()
    log = run_passes(graph, [PASS], options={"quantize": quantize, "progress": False,
                                              **options})
    verify(graph)
    return before, graph, log


def output_sqnr(before, after, inputs):
    return sqnr_db(interpret(before, inputs)[0], interpret(after, inputs)[0])


def ops(graph):
    return [n.op for n in graph.nodes]


def test_int8_weight_every_linear_with_bias_and_activation():
    before, graph, log = quantize(MLP, "int8-weight")
    rec = log.records[0]
    assert rec.status == "changed" and rec.matched("quant/qlinear") == 3
    assert ops(graph) == ["rms_norm", "qlinear", "qlinear", "add", "qlinear"]
    up, down, head = graph.find("qlinear")
    assert str(up.inputs[1].type) == "u8{int8 g64 asym k64}[128, 64]"
    assert str(down.inputs[1].type) == "u8{int8 g128 asym k128}[64, 128]"
    assert str(up.inputs[2].type) == "f32[128, 1]" and len(up.inputs) == 5
    assert str(up.inputs[3].type) == "f32[128, 1]"  # asymmetric: integer zero points
    assert torch.equal(up.inputs[3].const, up.inputs[3].const.round())
    assert up.inputs[4].name == "bup"  # bias kept
    assert up.attrs["activation"] == "gelu" and len(down.inputs) == 4
    assert up.source == "layers.0.mlp.up_proj" and up.meta["quant_layer"] == "layers.0.mlp.up_proj"
    assert up.meta["origin"] == f"{PASS}/quant/qlinear"
    assert not {"wup", "wdown", "whead"} & set(graph.constants)  # float weights dropped
    inputs = batches(1)[0]
    assert output_sqnr(before, graph, inputs) > 35
    report = log.quant_report()
    assert [lr.name for lr in report.layers] == ["layers.0.mlp.up_proj",
                                                 "layers.0.mlp.down_proj", "lm_head"]
    assert all(lr.sqnr_db > 38 and lr.sqnr_on == "weight" and lr.bits == 8
               for lr in report.layers)
    assert report.layer("lm_head").notes[0] == "LM head"
    assert report.float_bytes == 4 * (64 + 128 * 64 + 128 + 64 * 128 + 96 * 64)
    assert report.quant_bytes == 64 * 4 + 128 * 4 + (128 * 64 + 64 * 128 + 96 * 64) \
        + 2 * 4 * (128 + 64 + 96)  # codes, bias, norm weight; f32 scales and zero points
    assert graph.meta["quant"]["scheme"] == "int8-weight"
    # no calibration, no evaluation batches, no example inputs
    assert report.kl is None and report.measured_on.startswith("not measured")


def test_without_the_option_nothing_happens():
    graph = parse_graph(MLP)
    text = print_graph(graph)
    log = run_passes(graph, [PASS], options={})
    assert log.records[0].status == "unchanged" and print_graph(graph) == text
    assert log.quant_report() is None and not log.records[0].data


def test_int4_groups_default_and_explicit():
    text = MLP.replace("[96, 64]", "[96, 64]")
    _, graph, log = quantize(text, "int4-weight")
    up, down, head = graph.find("qlinear")
    assert str(up.inputs[1].type) == "u8{int4 g64 asym k64}[128, 32]"
    assert str(down.inputs[1].type) == "u8{int4 g128 asym k128}[64, 64]"
    assert str(up.inputs[3].type) == "f32[128, 1]"  # zeros
    assert str(head.inputs[1].type) == "u8{int8 g64 asym k64}[96, 64]"  # head: int8 by default
    report = log.quant_report()
    assert "group 64 (K=64 is not a multiple of 128)" in report.layer("layers.0.mlp.up_proj").notes
    _, graph, _ = quantize(MLP, {"scheme": "int4-weight", "group": 32, "symmetric": True})
    assert [str(n.inputs[1].type.quant) for n in graph.find("qlinear")] == \
        ["int4 g32 sym k64", "int4 g32 sym k128", "int8 g64 asym k64"]  # head: its defaults


def test_a_group_that_does_not_divide_is_refused_for_every_layer_before_any_change():
    graph = parse_graph(MLP)
    text = print_graph(graph)
    with pytest.raises(PassError) as e:
        run_passes(graph, [PASS], options={"quantize": {"scheme": "int4-weight", "group": 48}})
    msg = str(e.value)
    assert "layers.0.mlp.up_proj (K=64): group 48 does not divide K=64; groups that work: " \
           "16, 32, 64" in msg
    assert "layers.0.mlp.down_proj (K=128)" in msg and "nothing was changed" in msg
    assert "lm_head" not in msg  # the head is int8 per channel
    assert print_graph(graph) == text


def test_keep_float_layers_and_head_options():
    _, graph, log = quantize(MLP, {"scheme": "int4-weight", "keep_float": ["*.up_proj"],
                                   "layers": {"*.down_proj": "fp8"}, "head": "float"})
    assert ops(graph) == ["rms_norm", "linear", "qlinear", "add", "linear"]
    assert graph.find("qlinear")[0].inputs[1].type.quant.name == "fp8e4m3"
    report = log.quant_report()
    assert report.layer("layers.0.mlp.up_proj").kept_float == "keep_float pattern '*.up_proj'"
    assert report.layer("lm_head").kept_float == "head option says float"
    why = log.why_not("quant/keep-float")
    assert "layers.0.mlp.up_proj kept float: keep_float pattern" in why
    assert "lm_head kept float" in why


def test_min_sqnr_keeps_weak_layers_float_with_the_reason():
    _, graph, log = quantize(MLP, {"scheme": "int4-weight", "min_sqnr": 30})
    report = log.quant_report()
    assert [lr.op for lr in report.layers] == ["linear", "linear", "qlinear"]
    reason = report.layer("layers.0.mlp.up_proj").kept_float
    assert reason.startswith("weight SQNR ") and reason.endswith("dB < min_sqnr 30 dB")
    assert report.layer("lm_head").sqnr_db > 30
    # the option from optimize(min_sqnr=) works the same; calibration rows give output SQNR
    _, graph, log = quantize(MLP, "int4-weight", min_sqnr=30, calibration=batches())
    assert log.quant_report().layer("layers.0.mlp.up_proj").kept_float.startswith("output SQNR")


CONV1D = """
graph main(%x: f32[batch, seq, 64]) {
  const %w: f32[64, 128]
  const %b: f32[128]
  %m: f32[batch, seq, 128] = matmul(%x, %w)  # @h.0.mlp.c_fc
  %y: f32[batch, seq, 128] = add(%m, %b)  # @h.0.mlp.c_fc
  return %y
}"""


def test_gpt2_conv1d_matmul_and_bias_become_one_qlinear_of_the_transpose():
    before, graph, _ = quantize(CONV1D, "int8-weight")
    (q,) = graph.nodes
    assert q.op == "qlinear" and str(q.inputs[1].type) == "u8{int8 g64 asym k64}[128, 64]"
    assert q.inputs[4].name == "b"
    assert output_sqnr(before, graph, batches(1)[0]) > 38


SHARED = """
graph main(%x: f32[batch, seq, 64], %z: f32[batch, seq, 64]) {
  const %w: f32[64, 64]
  %a: f32[batch, seq, 64] = linear(%x, %w, _)  # @blocks.0.proj
  %b: f32[batch, seq, 64] = linear(%z, %w, _)  # @blocks.1.proj
  %y: f32[batch, seq, 64] = add(%a, %b)
  return %y
}"""


def test_a_shared_weight_is_quantized_once():
    _, graph, log = quantize(SHARED, "int4-weight")
    a, b = graph.find("qlinear")
    assert a.inputs[1:] == b.inputs[1:]
    assert len([c for c in graph.constants.values() if c.type.quant is not None]) == 1
    assert "shares the quantized weight of an earlier layer" in \
        log.quant_report().layer("blocks.1.proj").notes


TIED = """
graph main(%ids: i64[batch, seq]) {
  const %wte: f32[100, 64]
  const %nw: f32[64]
  %e: f32[batch, seq, 64] = embedding(%wte, %ids)  # @wte
  %h: f32[batch, seq, 64] = rms_norm(%e, %nw)  # @norm
  %l: f32[batch, seq, 100] = linear(%h, %wte, _)  # @lm_head
  return %l
}"""


def test_tied_embedding_keeps_the_float_table_and_the_head_gets_its_own_copy():
    gen = torch.Generator().manual_seed(0)
    ids = [[torch.randint(0, 100, (2, 12), generator=gen)]]
    before, graph, log = quantize(TIED, "int4-weight", evaluation=ids)
    emb, _, head = graph.nodes
    assert emb.op == "embedding" and emb.inputs[0].name == "wte"
    assert head.op == "qlinear" and head.inputs[1].type.quant.bits == 8  # head rule: int8
    report = log.quant_report()
    (lr,) = report.layers
    assert "tied: embedding @wte keeps the float weight" in "; ".join(lr.notes)
    assert report.quant_bytes == report.float_bytes + lr.quant_bytes  # the copy is extra
    # end to end on token ids: KL, top-1, perplexity
    assert report.measured_on == "the evaluation inputs (1 batch)" and report.tokens == 24
    assert 0 <= report.kl < 1e-3 and report.top1 > 0.9
    assert math.isclose(report.ppl_quant, report.ppl_float, rel_tol=0.02)


def test_w8a8_act_quant_from_the_target_and_without_smoothing():
    _, graph, log = quantize(MLP, {"scheme": "w8a8", "smoothquant": 0})
    assert [n.attrs["act_quant"] for n in graph.find("qmatmul")] == ["token"] * 3
    assert str(graph.find("qmatmul")[0].inputs[1].type) == "u8{int8 g64 sym k64}[128, 64]"
    target = FakeTarget(act=("tensor", "token"))
    _, graph, log = quantize(MLP, {"scheme": "w8a8", "smoothquant": 0}, target=target)
    assert [n.attrs["act_quant"] for n in graph.find("qmatmul")] == ["tensor"] * 3
    assert ("int8 g64 sym k64", "qmatmul") in target.asked
    with pytest.raises(PassError, match="runs qmatmul with act_quant tensor only, not 'token'"):
        quantize(MLP, {"scheme": "w8a8", "smoothquant": 0, "act_quant": "token"},
                 target=FakeTarget(act=("tensor",)))


def test_w8a8_smoothquant_folds_into_the_norm_and_multiplies_elsewhere():
    before, graph, log = quantize(MLP, "w8a8", calibration=batches())
    # the head reads a residual add, not a norm: it gets a mul too
    assert ops(graph) == ["rms_norm", "qmatmul", "mul", "qmatmul", "add", "mul", "qmatmul"]
    norm = graph.nodes.__iter__().__next__()
    assert norm.inputs[1].name == "nw_smoothed"  # the up projection's 1/s is in the norm
    assert "nw" not in graph.constants
    report = log.quant_report()
    assert "1/s folded into rms_norm @layers.0.norm" in report.layer("layers.0.mlp.up_proj").notes
    assert any(n.startswith("1/s as a mul node") for n in
               report.layer("layers.0.mlp.down_proj").notes)
    assert any("mul node(s) by 1/s" in n for n in log.records[0].notes)
    assert output_sqnr(before, graph, batches(1, seed=5)[0]) > 30
    assert report.kl is not None and report.measured_on.startswith("the calibration inputs")


@pytest.mark.parametrize("scheme", ["int4-awq", "int4-gptq"])
def test_calibrated_int4_beats_round_to_nearest_on_the_calibration_rows(scheme):
    cal = batches(4, rows=16)
    before, graph, log = quantize(MLP, scheme, calibration=cal)
    _, _, rtn_log = quantize(MLP, "int4-weight", calibration=cal)
    ours, rtn = log.quant_report(), rtn_log.quant_report()
    for name in ("layers.0.mlp.up_proj", "layers.0.mlp.down_proj"):
        assert ours.layer(name).sqnr_on == "output"
        assert ours.layer(name).sqnr_db >= rtn.layer(name).sqnr_db - 0.05, name
    assert sum(ours.layer(n).sqnr_db - rtn.layer(n).sqnr_db for n in
               ("layers.0.mlp.up_proj", "layers.0.mlp.down_proj")) > 0.1
    assert output_sqnr(before, graph, cal[0]) > 15
    if scheme == "int4-awq":
        assert graph.nodes.__iter__().__next__().inputs[1].name == "nw_smoothed"


def test_fp8_refused_by_the_target_before_any_change():
    graph = parse_graph(MLP)
    text = print_graph(graph)
    target = FakeTarget(refuse=lambda qt, op: "fp8 needs a GPU target" if qt.name == "fp8e4m3"
                        else None)
    with pytest.raises(PassError) as e:
        run_passes(graph, [PASS], options={"quantize": "fp8", "target": target})
    assert "target 'fake' cannot run the quantized layers (nothing was changed): qlinear " \
           "fp8e4m3: fp8 needs a GPU target (layers layers.0.mlp.up_proj" in str(e.value)
    assert print_graph(graph) == text
    _, graph, _ = quantize(MLP, "int8-weight", target=target)  # int8 is fine there
    assert len(graph.find("qlinear")) == 3


@pytest.mark.parametrize("scheme", ["int4-gptq", "int4-awq", "w8a8"])
def test_calibrated_schemes_need_calibration(scheme):
    graph = parse_graph(MLP)
    text = print_graph(graph)
    with pytest.raises(PassError, match=f"{scheme} needs calibration data: pass calibration="):
        run_passes(graph, [PASS], options={"quantize": scheme})
    assert print_graph(graph) == text


def test_bad_calibration_batch_and_already_quantized():
    graph = parse_graph(MLP)
    text = print_graph(graph)
    bad = [[torch.randn(1, 4, 64)], [torch.randn(1, 4, 32)]]
    with pytest.raises(PassError) as e:
        run_passes(graph, [PASS], options={"quantize": "int4-awq", "calibration": bad})
    assert isinstance(e.value.__cause__, InputError)
    assert "calibration batch 1: input x: dim 2 must be 64" in str(e.value)
    assert print_graph(graph) == text
    _, graph, _ = quantize(MLP, "int8-weight")
    text = print_graph(graph)
    with pytest.raises(PassError, match="already quantized"):
        run_passes(graph, [PASS], options={"quantize": "int4-weight"})
    assert print_graph(graph) == text


def test_bad_option_is_a_pass_error():
    with pytest.raises(PassError, match="unknown scheme 'int2'"):
        quantize(MLP, "int2")


# -- the tiny models through O2 ---------------------------------------------------------------


def _captured(name, seq=16):
    from transfuse.frontend.torch_export import capture
    from transfuse.models import get_model

    model, inputs, dynamic = get_model(name, seq=seq)
    return capture(model, inputs, dynamic=dynamic)


def _ids(n, seq=24, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randint(0, 1000, (1, seq), generator=gen)] for _ in range(n)]


def test_llama_tiny_o2_int8_weight():
    cap = _captured("llama-tiny")
    graph = cap.graph
    float_graph = graph.clone()
    run_pipeline(float_graph, "O2")
    log = run_pipeline(graph, "O2", verify=True, sample_inputs=cap.example_inputs,
                       options={"quantize": "int8-weight", "progress": False,
                                "sample_inputs": cap.example_inputs})
    rec = log[PASS]
    assert rec.status == "changed" and "changes the model's function on purpose" in \
        " ".join(rec.notes)
    assert "linear" not in graph.op_histogram() and len(graph.find("qlinear")) == 9
    report = log.quant_report()
    assert {lr.name for lr in report.layers} >= {"layers.0.attn.qkv_proj",
                                                  "layers.1.mlp.gate_up_proj", "lm_head"}
    assert min(lr.sqnr_db for lr in report.layers) > 38
    assert report.measured_on == "the example inputs (1 batch)" and report.top1 > 0.9
    assert report.compression > 1.9
    inputs = _ids(1)[0]
    assert output_sqnr(float_graph, graph, inputs) > 30


def test_gpt2_tiny_o2_awq_folds_into_layer_norms_and_keeps_the_tied_table():
    cap = _captured("gpt2-tiny")
    graph = cap.graph
    float_graph = graph.clone()
    run_pipeline(float_graph, "O2")
    log = run_pipeline(graph, "O2", options={"quantize": "int4-awq", "calibration": _ids(2),
                                             "progress": False})
    hist = graph.op_histogram()
    assert hist["qlinear"] == 9 and "linear" not in hist
    report = log.quant_report()
    head = report.layer("lm_head")
    assert head.scheme == "int8-weight" and any(n.startswith("tied:") for n in head.notes)
    qkv = report.layer("h.0.attn.qkv_proj")
    assert "1/s folded into add_norm @h.0.ln_1" in qkv.notes
    assert [n.op for n in graph.nodes if n.op == "embedding"] == ["embedding", "embedding"]
    assert report.ppl_float is not None and abs(report.ppl_increase) < 0.05
    assert output_sqnr(float_graph, graph, _ids(1, seed=3)[0]) > 15


QKV = """
graph main(%x: f32[batch, seq, 64]) {
  const %lw: f32[64]
  const %lb: f32[64]
  const %wq: f32[64, 64]
  const %wk: f32[32, 64]
  const %wv: f32[32, 64]
  %h: f32[batch, seq, 64] = layer_norm(%x, %lw, %lb)  # @h.0.ln_1
  %q: f32[batch, seq, 64] = linear(%h, %wq, _)  # @h.0.attn.q_proj
  %k: f32[batch, seq, 32] = linear(%h, %wk, _)  # @h.0.attn.k_proj
  %v: f32[batch, seq, 32] = linear(%h, %wv, _)  # @h.0.attn.v_proj
  %kv: f32[batch, seq, 64] = concat(%k, %v) {axis=-1}
  %y: f32[batch, seq, 64] = add(%q, %kv)
  return %y
}"""


def test_unmerged_projections_share_one_set_of_scales_folded_into_the_layer_norm():
    """onnxruntime keeps q/k/v apart (merge_projections off): they read one norm output,
    share one AWQ scale search and the layer norm's weight and bias take 1/s."""
    cal = batches(3, rows=16)
    before, graph, log = quantize(QKV, {"scheme": "int4-awq", "group": 32}, calibration=cal)
    assert ops(graph) == ["layer_norm", "qlinear", "qlinear", "qlinear", "concat", "add"]
    norm = graph.find("layer_norm")[0]
    assert [v.name for v in norm.inputs[1:]] == ["lw_smoothed", "lb_smoothed"]
    notes = log.quant_report().layer("h.0.attn.k_proj").notes
    assert any(n.startswith("AWQ scales") and n.endswith("shared by 3 layers") for n in notes)
    assert output_sqnr(before, graph, batches(1, rows=16, seed=9)[0]) > 15
    # one layer kept float: the norm output has another reader, so 1/s is a mul
    _, graph, _ = quantize(QKV, {"scheme": "int4-awq", "group": 32,
                                 "keep_float": ["*.v_proj"]}, calibration=cal)
    assert ops(graph) == ["layer_norm", "mul", "qlinear", "qlinear", "linear", "concat", "add"]
    assert graph.find("layer_norm")[0].inputs[1].name == "lw"


def test_last_position_logits_are_compared_without_perplexity():
    _, graph, log = quantize(MLP, "int8-weight", evaluation=batches(2))
    r = log.quant_report()
    assert r.tokens == 16 and r.ppl_float is None and r.kl >= 0  # float inputs: no token ids


SWIGLU = """
graph main(%x: f32[batch, seq, 64]) {
  const %nw: f32[64]
  const %wgu: f32[256, 64]
  const %bgu: f32[256]
  const %wdown: f32[64, 128]
  %h: f32[batch, seq, 64] = rms_norm(%x, %nw)  # @layers.0.post_norm
  %gu: f32[batch, seq, 256] = linear(%h, %wgu, %bgu)  # @layers.0.mlp.gate_proj
  %g: f32[batch, seq, 128], %u: f32[batch, seq, 128] = split(%gu) {axis=-1, sizes=[128, 128]}
  %a: f32[batch, seq, 128] = swiglu(%g, %u)  # @layers.0.mlp
  %d: f32[batch, seq, 64] = linear(%a, %wdown, _)  # @layers.0.mlp.down_proj
  %y: f32[batch, seq, 64] = add(%x, %d)
  return %y
}"""


@pytest.mark.parametrize("scheme", ["int4-awq", "w8a8"])
def test_down_projection_scales_fold_into_the_up_rows(scheme):
    cal = batches(3, rows=16)
    before, graph, log = quantize(SWIGLU, scheme, calibration=cal)
    q = "qmatmul" if scheme == "w8a8" else "qlinear"
    assert ops(graph) == ["rms_norm", q, "split", "swiglu", q, "add"]  # no mul anywhere
    report = log.quant_report()
    assert "1/s folded into rows 128:256 of layers.0.mlp.gate_proj" in \
        report.layer("layers.0.mlp.down_proj").notes
    assert "rows 128:256 divided by the input scales of layers.0.mlp.down_proj" in \
        report.layer("layers.0.mlp.gate_proj").notes
    assert graph.find(q)[0].inputs[-1].name == "bgu_scaled"  # the bias rows too
    assert output_sqnr(before, graph, batches(1, rows=16, seed=7)[0]) > 15


def test_folds_stay_exact_when_min_sqnr_keeps_the_layers_float():
    """Everything kept float after the scales were folded: the up rows are rescaled float
    constants, and the down projection's input gets a mul by s: the model is unchanged."""
    cal = batches(3, rows=16)
    before, graph, log = quantize(SWIGLU, {"scheme": "int4-awq", "min_sqnr": 1000},
                                  calibration=cal)
    assert ops(graph) == ["rms_norm", "linear", "split", "swiglu", "mul", "linear", "add"]
    assert graph.find("linear")[0].inputs[1].name == "wgu_scaled"
    x = batches(1, rows=16, seed=7)[0]
    torch.testing.assert_close(interpret(graph, x)[0], interpret(before, x)[0], rtol=1e-4,
                               atol=1e-4)
    notes = log.quant_report().layer("layers.0.mlp.down_proj").notes
    assert any("a mul by s restores it" in n for n in notes)
