"""The TensorRT ONNX lowering (``transfuse/codegen/tensorrt/lower.py``) without TensorRT: for
tiny GPT-2 / Llama / BERT, fp32 and int4-weight, both attention forms, the model passes the
full ONNX checker, strict type inference, uses only ops of TensorRT's list (``ops.py``) and runs
in ONNX Runtime with the python target's outputs.

ONNX Runtime runs at ORT_ENABLE_BASIC: at ORT_ENABLE_ALL it fuses DequantizeLinear(int4) +
MatMul into MatMulNBits, which quantizes activations (measured 1.1e-2 relative error on
gpt2-tiny int4) - its own approximation, not the model's. The python target runs the reference
qlinear kernel (``TRANSFUSE_QUANT_KERNEL=dequant_f32``; its bf16 kernels round).
"""

from __future__ import annotations

import collections

import onnx
import pytest
import torch
from onnx import TensorProto

import transfuse
from transfuse.codegen.tensorrt.lower import check_strongly_typed, lower_tensorrt
from transfuse.codegen.tensorrt.ops import SUPPORTED_10_15, support_for, unsupported_ops
from transfuse.errors import LoweringError
from transfuse.models import get_model

ort = pytest.importorskip("onnxruntime")

MODELS = ("gpt2-tiny", "llama-tiny", "bert-tiny")
RTOL = 1e-4


@pytest.fixture(scope="module")
def compiled():
    """(model name, quantize) -> the python-target compile at seq 16 (dynamic seq)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TRANSFUSE_QUANT_KERNEL", "dequant_f32")
    out = {}
    try:
        for name in MODELS:
            for q in (None, "int4-weight"):
                model, args, dyn = get_model(name, seq=16)
                out[name, q] = transfuse.optimize(model, args, dynamic=dyn, target="python",
                                                  quantize=q)
        yield out
    finally:
        mp.undo()


def _run(model: onnx.ModelProto, args) -> torch.Tensor:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feeds = {i.name: a.numpy() for i, a in zip(s.get_inputs(), args)}
    return torch.from_numpy(s.run(None, feeds)[0])


@pytest.mark.parametrize("attention", ["onnx", "decomposed"])
@pytest.mark.parametrize("quantize", [None, "int4-weight"])
@pytest.mark.parametrize("name", MODELS)
def test_matches_python_target(compiled, name, quantize, attention):
    c = compiled[name, quantize]
    m = lower_tensorrt(c.graph, c.signature, attention=attention)
    onnx.checker.check_model(m, full_check=True)
    check_strongly_typed(m)
    assert unsupported_ops(m, "10.14") == []
    ops = collections.Counter(n.op_type for n in m.graph.node)
    assert all(n.domain in ("", "ai.onnx") for n in m.graph.node)
    assert set(ops) <= set(SUPPORTED_10_15)
    assert ("Attention" in ops) == (attention == "onnx")
    assert ops["Softmax"] == (0 if attention == "onnx" else 2)
    norm = "RMSNormalization" if name == "llama-tiny" else "LayerNormalization"
    assert ops[norm] == 5
    if quantize:
        assert ops["DequantizeLinear"] == sum(n.op == "qlinear" for n in c.graph.nodes) > 0
        types = {t.data_type for t in m.graph.initializer}
        assert TensorProto.INT4 in types
        for n in m.graph.node:  # TensorRT wants no zero point
            if n.op_type == "DequantizeLinear":
                assert len(n.input) == 2
        # no float copy of a quantized weight
        assert not any(t.data_type == TensorProto.FLOAT and len(t.dims) == 2
                       and t.name.endswith(("_dequant_T", "_KN")) for t in m.graph.initializer)
    for seq, seed in ((16, 1), (23, 2)):
        _, args, _ = get_model(name, seq=seq, seed=seed)
        ref = c(*args)
        out = _run(m, args)
        assert out.shape == ref.shape
        rel = ((out - ref).norm() / ref.norm()).item()
        assert rel <= RTOL, (name, quantize, attention, seq, rel)


def test_int4_blocked_and_int8_per_channel(compiled):
    """gpt2-tiny int4 has g128 blocks (mlp.proj, K=256) and an int8 per-channel lm_head."""
    c = compiled["gpt2-tiny", "int4-weight"]
    m = lower_tensorrt(c.graph, c.signature)
    blocked = [n for n in m.graph.node if n.op_type == "DequantizeLinear"
               and any(a.name == "block_size" and a.i == 128 for a in n.attribute)]
    assert len(blocked) == 2
    types = {t.name: t.data_type for t in m.graph.initializer}
    for n in m.graph.node:
        if n.op_type != "DequantizeLinear":
            continue
        attrs = {a.name: a.i for a in n.attribute}
        if types[n.input[0]] == TensorProto.INT4:  # always blocked (per channel: K)
            assert attrs["axis"] == 0 and attrs["block_size"] in (64, 128)
        else:  # the int8 per-channel lm_head: per axis
            assert types[n.input[0]] == TensorProto.INT8
            assert attrs == {"axis": 1}


def test_asymmetric_refuse_names_layer(compiled):
    c = compiled["llama-tiny", "int4-weight"]
    with pytest.raises(LoweringError, match=r"qlinear.*zero points"):
        lower_tensorrt(c.graph, c.signature, asymmetric="refuse")


def test_bad_options(compiled):
    c = compiled["gpt2-tiny", None]
    with pytest.raises(LoweringError, match="attention must be"):
        lower_tensorrt(c.graph, c.signature, attention="flash")
    with pytest.raises(LoweringError, match="opset 20"):
        lower_tensorrt(c.graph, c.signature, opset=20)
    with pytest.raises(LoweringError, match="parses opsets 9..20, not 21"):
        lower_tensorrt(c.graph, c.signature, opset=21, trt_version="10.8",
                       attention="decomposed")
    with pytest.raises(LoweringError, match="TensorRT 10.x or 11.x"):
        lower_tensorrt(c.graph, c.signature, trt_version="8.6")


def test_opset21_decomposed(compiled):
    """Opset 21 (blocked DequantizeLinear, no Attention / RMSNormalization): decomposed."""
    c = compiled["llama-tiny", "int4-weight"]
    with pytest.raises(LoweringError, match="no native ONNX Attention"):
        lower_tensorrt(c.graph, c.signature, opset=21, trt_version="10.8")
    m = lower_tensorrt(c.graph, c.signature, opset=21, attention="decomposed")
    ops = {n.op_type for n in m.graph.node}
    assert "Attention" not in ops and "RMSNormalization" not in ops
    assert unsupported_ops(m, "10.14") == []
    _, args, _ = get_model("llama-tiny", seq=16, seed=1)
    ref = c(*args)
    assert ((_run(m, args) - ref).norm() / ref.norm()).item() <= RTOL


def test_unsupported_ops_flags_what_tensorrt_refuses():
    from onnx import helper
    nodes = [helper.make_node("Attention", ["q", "k", "v"], ["y"], softcap=5.0),
             helper.make_node("MatMulNBits", ["y"], ["z"], domain="com.microsoft"),
             helper.make_node("DequantizeLinear", ["w", "s", "zp"], ["d"]),
             helper.make_node("MatMulInteger", ["a", "b"], ["c"])]
    g = helper.make_graph(nodes, "g", [], [], initializer=[
        helper.make_tensor("zp", TensorProto.INT8, [], [3])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 23)])
    assert unsupported_ops(m, "10.15") == [
        "Attention(softcap)", "DequantizeLinear(x_zero_point)", "MatMulInteger",
        "com.microsoft.MatMulNBits"]
    assert "Attention" in unsupported_ops(m, "10.8")
    assert support_for("11.0").opsets == range(9, 25)


# -- single ops against the IR interpreter -----------------------------------------------------

EXACT = 1e-5


def _check(g, feeds, *, attention="onnx", expect=(), forbid=()):
    """Lower ``g`` for TensorRT, check op presence and numerics against the interpreter."""
    from transfuse.ir.interpret import interpret
    m = lower_tensorrt(g, attention=attention)
    onnx.checker.check_model(m, full_check=True)
    assert unsupported_ops(m, "10.14") == []
    ops = {n.op_type for n in m.graph.node}
    for op in expect:
        assert op in ops, (op, sorted(ops))
    for op in forbid:
        assert op not in ops, (op, sorted(ops))
    want = interpret(g, feeds)[0]
    got = _run(m, feeds)
    assert got.shape == want.shape
    assert not torch.isnan(got).any()
    assert ((got - want).norm() / max(want.norm(), 1e-12)).item() <= EXACT, (got - want).abs().max()
    return m, got


def _attn(sig: str, body: str):
    from transfuse.ir.parser import parse_graph
    return parse_graph(f"graph a({sig}) {{\n  {body}\n  return %a\n}}")


QKV = "%q: f32[b, 4, s, 16], %k: f32[b, 2, s, 16], %v: f32[b, 2, s, 16]"


def _qkv(b=2, s=6, hkv=2, t=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = s if t is None else t
    return [torch.randn(b, 4, s, 16, generator=g), torch.randn(b, hkv, t, 16, generator=g),
            torch.randn(b, hkv, t, 16, generator=g)]


@pytest.mark.parametrize("attrs, native", [
    ("causal, kv_heads=2", True),
    ("causal, kv_heads=2, window=3", True),
    ("kv_heads=2, scale=0.3", True),
    ("causal, kv_heads=2, alibi=[0.5, 0.25, 0.125, 0.0625]", True),
    ("causal, kv_heads=2, softcap=2.0", False),  # TensorRT refuses Attention's softcap
])
def test_attention_forms(attrs, native):
    g = _attn(QKV, f"%a: f32[b, 4, s, 16] = attention(%q, %k, %v) {{{attrs}}}")
    m, _ = _check(g, _qkv(), expect=["Attention"] if native else ["Softmax"],
                  forbid=[] if native else ["Attention"])
    if native and "window" not in attrs and "alibi" not in attrs:
        assert not any(n.op_type == "Where" for n in m.graph.node)  # is_causal, no mask
    _check(g, _qkv(), attention="decomposed", forbid=["Attention"])


def test_attention_padding_bias_and_fully_padded_row():
    g = _attn(QKV.replace("%k: f32[b, 2", "%k: f32[b, 4").replace("%v: f32[b, 2", "%v: f32[b, 4")
              + ", %bias: f32[b, 1, 1, s], %kpm: i64[b, s]",
              "%a: f32[b, 4, s, 16] = attention(%q, %k, %v, %bias, %kpm) {}")
    q, k, v = _qkv(b=3, s=5, hkv=4)
    bias = torch.zeros(3, 1, 1, 5)
    bias[0, ..., -2:] = torch.finfo(torch.float32).min
    kpm = torch.ones(3, 5, dtype=torch.int64)
    kpm[1, 3:] = 0
    kpm[2] = 0  # every key padded: zeros in the IR
    _, got = _check(g, [q, k, v, bias, kpm], expect=["Attention", "Expand"])
    assert got[2].abs().max() == 0


def test_attention_longer_keys_bottom_right_causal_and_cross_dims():
    g = _attn("%q: f32[2, 4, 3, 16], %k: f32[2, 2, 7, 16], %v: f32[2, 2, 7, 8]",
              "%a: f32[2, 4, 3, 8] = attention(%q, %k, %v) {causal, kv_heads=2}")
    q, k, v = _qkv(s=3, t=7)
    m, _ = _check(g, [q, k, v[..., :8].contiguous()], expect=["Attention", "LessOrEqual"])
    attn = next(n for n in m.graph.node if n.op_type == "Attention")
    assert not any(a.name == "is_causal" for a in attn.attribute)  # bottom-right as a mask


def test_attention_bshd_layout():
    g = _attn("%q: f32[b, s, 4, 16], %k: f32[b, s, 2, 16], %v: f32[b, s, 2, 16]",
              '%a: f32[b, s, 4, 16] = attention(%q, %k, %v) {causal, kv_heads=2, layout="bshd"}')
    feeds = [x.transpose(1, 2).contiguous() for x in _qkv()]
    _check(g, feeds, expect=["Attention"])


def _qlinear(qtext: str, *, frac: bool = False, bias: bool = True, act=None, n: int = 24):
    from transfuse.ir.graph import Graph
    from transfuse.ir.quant import quantize_rtn
    from transfuse.ir.types import DType, QuantType, TensorType
    qt = QuantType.parse(qtext)
    g = Graph("q")
    x = g.add_input("x", TensorType(DType.f32, ("b", "s", qt.k)))
    torch.manual_seed(0)
    q = quantize_rtn(torch.randn(n, qt.k), qt)
    w = g.add_constant(q.qweight, "w", quant=qt)
    s = g.add_constant(q.scales, "w_scales")
    z = None
    if not qt.symmetric:
        zeros = q.zeros + (torch.rand_like(q.zeros) - 0.5 if frac else 0.0)
        z = g.add_constant(zeros, "w_zeros")
    b = g.add_constant(torch.randn(n), "bias") if bias else None
    g.set_outputs([g.op("qlinear", x, w, s, z, b, activation=act)])
    return g


@pytest.mark.parametrize("qtext, frac, act", [
    ("int4 g32 sym k64", False, None),
    ("int4 g32 asym k64", False, "gelu"),
    ("int4 g32 asym k64", True, None),
    ("int4 g64 asym k64", True, "silu"),  # per channel, fractional zeros
    ("int8 g32 asym k64", True, None),
    ("int8 g64 sym k64", False, "relu"),
])
def test_qlinear_forms(qtext, frac, act):
    g = _qlinear(qtext, frac=frac, act=act)
    x = torch.randn(2, 5, 64)
    m, _ = _check(g, [x], expect=["DequantizeLinear", "MatMul"])
    dq = next(n for n in m.graph.node if n.op_type == "DequantizeLinear")
    assert len(dq.input) == 2  # no zero point
    sym = " sym " in qtext
    assert ("ReduceSum" in {n.op_type for n in m.graph.node}) == (not sym)


def test_qlinear_fp8_weight():
    g = _qlinear("fp8e4m3 g64 sym k64")
    m, _ = _check(g, [torch.randn(2, 5, 64)], expect=["DequantizeLinear"])
    assert TensorProto.FLOAT8E4M3FN in {t.data_type for t in m.graph.initializer}


def test_qmatmul_refused_with_reason():
    from transfuse.ir.graph import Graph
    from transfuse.ir.quant import quantize_rtn
    from transfuse.ir.types import DType, QuantType, TensorType
    qt = QuantType("int", 8, 64, True, 64)
    g = Graph("qmm")
    x = g.add_input("x", TensorType(DType.f32, ("s", 64)))
    q = quantize_rtn(torch.randn(16, 64), qt)
    g.set_outputs([g.op("qmatmul", x, g.add_constant(q.qweight, "w", quant=qt),
                        g.add_constant(q.scales, "w_scales"), None, act_quant="token")])
    with pytest.raises(LoweringError, match="qmatmul.*zero point"):
        lower_tensorrt(g)


def test_check_strongly_typed_refuses_mixed_types():
    from onnx import helper
    g = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["c"])], "mixed",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2]),
         helper.make_tensor_value_info("b", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [2])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 23)])
    with pytest.raises(LoweringError, match="not strongly typed"):
        check_strongly_typed(m)


@pytest.mark.parametrize("name, quantize, attention",
                         [(n, q, "onnx") for n in MODELS for q in (None, "int4-weight")]
                         + [("bert-tiny", "int4-weight", "decomposed")])
def test_polygraphy_lint(compiled, name, quantize, attention, tmp_path):
    """``polygraphy check lint`` (ONNX checker + an ONNX Runtime run per node) passes: every
    tiny model, fp32 and int4-weight."""
    import json
    import pathlib
    import shutil
    import subprocess
    import sys
    pytest.importorskip("polygraphy", reason="polygraphy is not installed (the dev extra)")
    tool = shutil.which("polygraphy") or str(pathlib.Path(sys.executable).parent / "polygraphy")
    c = compiled[name, quantize]
    path, report = tmp_path / "model.onnx", tmp_path / "lint.json"
    onnx.save(lower_tensorrt(c.graph, c.signature, attention=attention), str(path))
    run = subprocess.run([sys.executable, tool, "check", "lint", str(path), "-o", str(report)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    summary = json.loads(report.read_text())["summary"]
    assert summary["failing"] == [] and summary["passing"]


# -- generation graphs -------------------------------------------------------------------------


def test_generation_graph_caches_as_outputs():
    """A cached_attention graph: every written cache is an output ``<cache>_present`` (named
    in the metadata); fed back step after step it equals the op's reference, as do the
    outputs (prefill of three sequences in scattered slots, decode, a mixed step)."""
    import json

    from transfuse.codegen.tensorrt.lower import CACHE_OUTPUTS_KEY
    from transfuse.ir.opdefs.generation import cached_attention
    from transfuse.ir.parser import parse_graph
    h, hkv, d, slots, length = 4, 2, 8, 3, 16
    cache = f"f32[{slots}, {length}, {hkv}, {d}]"
    g = parse_graph(
        f"graph g(%q: f32[1, {h}, n, {d}], %k: f32[1, {hkv}, n, {d}], %v: f32[1, {hkv}, n, {d}],"
        f" %kc: {cache}, %vc: {cache}, %pos: i64[n], %sot: i64[n], %lens: i64[b],"
        f" %table: i64[b]) {{\n"
        f"  %a: f32[1, {h}, n, {d}] = cached_attention(%q, %k, %v, %kc, %vc, %pos, %sot, %lens,"
        f" %table) {{kv_heads={hkv}, window=3}}\n  return %a\n}}")
    m = lower_tensorrt(g, attention="onnx")
    onnx.checker.check_model(m, full_check=True)
    assert unsupported_ops(m, "10.14") == []
    meta = {p.key: p.value for p in m.metadata_props}
    assert json.loads(meta[CACHE_OUTPUTS_KEY]) == {"kc": "kc_present", "vc": "vc_present"}
    assert [o.name for o in m.graph.output][1:] == ["kc_present", "vc_present"]
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    attrs = {"scale": None, "window": 3, "kv_heads": hkv, "alibi": None, "softcap": None,
             "layout": "bhsd", "paged": False, "block_size": None, "cache_order": "token-major"}
    gen = torch.Generator().manual_seed(0)
    ours = [torch.zeros(slots, length, hkv, d) for _ in range(2)]
    ref = [torch.zeros(slots, length, hkv, d) for _ in range(2)]
    slot_of = torch.tensor([2, 0, 1])
    for starts, counts in (([0, 0, 0], [5, 2, 7]), ([5, 2, 7], [1, 1, 1]),
                           ([6, 3, 8], [3, 1, 2])):
        n = sum(counts)
        q, k, v = (torch.randn(1, x, n, d, generator=gen) for x in (h, hkv, hkv))
        pos = torch.cat([torch.arange(s, s + c) for s, c in zip(starts, counts)])
        sot = torch.cat([torch.full((c,), i) for i, c in enumerate(counts)])
        lens = torch.tensor([s + c for s, c in zip(starts, counts)])
        feeds = [q, k, v, *ours, pos, sot, lens, slot_of]
        got, kc, vc = sess.run(None, {i.name: t.numpy() for i, t in
                                      zip(sess.get_inputs(), feeds)})
        ours = [torch.from_numpy(kc), torch.from_numpy(vc)]
        want = cached_attention([q, k, v, *ref, pos, sot, lens, slot_of], attrs, {})
        torch.testing.assert_close(torch.from_numpy(got), want, atol=1e-5, rtol=1e-5)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_model_is_strongly_typed(dtype):
    """llama-tiny in fp16 / bf16: checker, strict typing, TensorRT's op list; fp16 also runs
    in ORT against the python target (measured 7e-4: half rounding; ORT's CPU provider has
    no bf16 kernels for Mul/Add, so bf16 is checked without running)."""
    model, args, dyn = get_model("llama-tiny", seq=16)
    c = transfuse.optimize(model.to(dtype), args, dynamic=dyn, target="python")
    m = lower_tensorrt(c.graph, c.signature)
    onnx.checker.check_model(m, full_check=True)
    check_strongly_typed(m)
    assert unsupported_ops(m, "10.14") == []
    ops = collections.Counter(n.op_type for n in m.graph.node)
    assert ops["Attention"] == 2 and ops["RMSNormalization"] == 5
    if dtype == torch.float16:
        ref = c(*args).float()
        out = _run(m, args).float()
        assert ((out - ref).norm() / ref.norm()).item() <= 3e-3


def test_attention_square_causal_with_bias_keeps_is_causal():
    g = _attn(QKV + ", %bias: f32[b, 1, s, s]",
              "%a: f32[b, 4, s, 16] = attention(%q, %k, %v, %bias) {causal, kv_heads=2}")
    q, k, v = _qkv()
    m, _ = _check(g, [q, k, v, torch.randn(2, 1, 6, 6)], expect=["Attention"],
                  forbid=["Expand", "Where"])
    attn = next(n for n in m.graph.node if n.op_type == "Attention")
    assert len(attn.input) == 4 and {a.name: a.i for a in attn.attribute}["is_causal"] == 1
