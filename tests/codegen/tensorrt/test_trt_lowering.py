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
    assert TensorProto.INT8 in {t.data_type for t in m.graph.initializer}


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
