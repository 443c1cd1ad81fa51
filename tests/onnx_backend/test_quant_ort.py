"""``qlinear`` / ``qmatmul`` on the onnxruntime target (transfuse/codegen/onnx/quant.py).

Hand-built IR graphs (weights from ``quantize_rtn``) are lowered by the ``onnxruntime``
target and compared with the reference interpreter.

Tolerances: MatMulNBits runs with accuracy_level 4, where ORT quantizes x to int8 per block
(symmetric, one scale per block) and multiplies in integers: its output differs from the exact
product by ~0.5% of the output's norm on these random shapes (measured 0.5-0.8%), so the
default level is checked at :data:`LEVEL4_RTOL` = 2% (norm-relative). Exactness is checked two ways:
with accuracy_level 0 (ORT's f32 path; monkeypatched) every form must equal the reference to
f32 rounding, and one-hot rows of x (which int8 block quantization represents exactly) read
the dequantized weight columns back at the default level. W8A8 is integer arithmetic on both
sides: equal to the reference to f32 rounding.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from transfuse.codegen.onnx import OrtProgram, export_graph, quant, save_model
from transfuse.codegen.onnx.generation import GenerationOrtProgram
from transfuse.codegen.targets import get_target
from transfuse.errors import LoweringError
from transfuse.ir.graph import Graph
from transfuse.ir.interpret import interpret
from transfuse.ir.quant import dequantize, pack_codes, quantize_rtn
from transfuse.ir.types import DType, QuantType, TensorType

#: norm-relative error allowed at accuracy_level 4 (x rounded to int8 per block inside ORT)
LEVEL4_RTOL = 2e-2
#: exact paths: f32 rounding only
EXACT_RTOL = 1e-5


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def _quantized(g: Graph, n: int, qt: QuantType, *, frac_zeros: bool = False, name: str = "w"):
    """(qweight, scales, zeros) constants of a random [n, K] weight quantized to ``qt``."""
    q = quantize_rtn(torch.randn(n, qt.k), qt)
    w = g.add_constant(q.qweight, name, quant=qt)
    s = g.add_constant(q.scales, f"{name}_scales")
    z = None
    if not qt.symmetric:
        zeros = q.zeros + (torch.rand_like(q.zeros) - 0.5 if frac_zeros else 0.0)
        z = g.add_constant(zeros, f"{name}_zeros")
    return w, s, z


def _qlinear_graph(qtext: str, n: int = 40, *, bias: bool = False, act: str | None = None,
                   frac_zeros: bool = False, rank: int = 3) -> Graph:
    qt = QuantType.parse(qtext)
    g = Graph("qlinear")
    lead = ("b", "s")[: rank - 1]
    x = g.add_input("x", TensorType(DType.f32, (*lead, qt.k)))
    w, s, z = _quantized(g, n, qt, frac_zeros=frac_zeros)
    b = g.add_constant(torch.randn(n), "bias") if bias else None
    g.set_outputs([g.op("qlinear", x, w, s, z, b, activation=act)])
    return g


def _qmatmul_graph(k: int = 96, n: int = 40, *, act_quant: str, bias: bool = True) -> Graph:
    """Two qmatmuls of one x (they share its quantization), one with bias, one with relu."""
    qt = QuantType("int", 8, k, True, k)
    g = Graph("qmatmul")
    x = g.add_input("x", TensorType(DType.f32, ("b", "s", k)))
    w, s, _ = _quantized(g, n, qt)
    b = g.add_constant(torch.randn(n), "bias") if bias else None
    y1 = g.op("qmatmul", x, w, s, b, act_quant=act_quant, activation=None)
    y2 = g.op("qmatmul", x, w, s, None, act_quant=act_quant, activation="relu")
    g.set_outputs([y1, y2])
    return g


def _ms_nodes(model: onnx.ModelProto, op_type: str) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == op_type and n.domain == "com.microsoft"]


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


#: (quant type, bias, activation, fractional zeros): sym/asym, 4/8 bits, grouped and per
#: channel (K a multiple of 128, of 64 only, of neither: padded last block), groups above the
#: largest block (scales repeated per block), fractional zero points
QLINEAR_CASES = [
    ("int4 g32 sym k64", False, None, False),
    ("int4 g32 asym k64", True, "gelu", False),
    ("int4 g64 asym k128", True, "gelu_tanh", False),
    ("int8 g32 sym k96", True, None, False),
    ("int8 g64 asym k128", False, "silu", False),
    ("int4 g128 sym k128", False, "relu", False),
    ("int4 g576 sym k576", True, None, False),
    ("int8 g576 asym k576", False, None, False),
    ("int4 g100 asym k100", False, None, False),
    ("int8 g256 sym k512", False, None, False),
    ("int4 g48 sym k96", False, None, False),
    ("int4 g32 asym k96", True, None, True),
    ("int8 g96 asym k96", False, "silu", True),
]


@pytest.mark.parametrize("qtext, bias, act, frac", QLINEAR_CASES)
def test_qlinear_exact_at_accuracy_level_0(qtext, bias, act, frac, monkeypatch):
    """ORT's f32 path: the storage, scales, zero points (packed, default, fractional) and
    blocks mean exactly what the IR says."""
    monkeypatch.setattr(quant, "ACCURACY_LEVEL", 0)
    g = _qlinear_graph(qtext, bias=bias, act=act, frac_zeros=frac)
    prog = get_target("onnxruntime").build(g)
    assert prog.fused_counts["MatMulNBits"] == 1
    x = torch.randn(2, 3, g.inputs[0].type.shape[-1])
    (got,) = prog([x])
    (want,) = interpret(g, [x])
    assert _rel(got, want) < EXACT_RTOL


@pytest.mark.parametrize("qtext, bias, act, frac", QLINEAR_CASES)
def test_qlinear_default_accuracy_level(qtext, bias, act, frac):
    g = _qlinear_graph(qtext, bias=bias, act=act, frac_zeros=frac)
    prog = get_target("onnxruntime").build(g)
    (node,) = _ms_nodes(prog.model_proto, "MatMulNBits")
    a = _attrs(node)
    qt = QuantType.parse(qtext)
    assert (a["accuracy_level"], a["bits"], a["K"], a["N"]) == (4, qt.bits, qt.k, 40)
    assert a["block_size"] == quant.block_size(qt)
    x = torch.randn(2, 3, qt.k)
    (got,) = prog([x])
    (want,) = interpret(g, [x])
    assert _rel(got, want) < LEVEL4_RTOL


@pytest.mark.parametrize("bits", [4, 8])
def test_one_hot_rows_read_the_weight_back(bits):
    """Nibble order and default zero points at the default level: x = I (exact in int8 blocks)
    gives y = dequant(W).T. The codes differ between the low and high nibble of every byte, so
    a swapped order cannot pass."""
    k, n = 64, 24
    qt = QuantType("int", bits, 32, True, k)
    codes = (torch.arange(n * k).reshape(n, k) * 7 % (2 ** bits)).to(torch.uint8)
    codes[:, 0::2] = codes[:, 0::2] // 2  # low nibble != high nibble
    g = Graph("onehot")
    x = g.add_input("x", TensorType(DType.f32, (k, k)))
    scales = torch.rand(n, qt.groups) + 0.5
    w = g.add_constant(pack_codes(codes, bits), "w", quant=qt)
    s = g.add_constant(scales, "s")
    g.set_outputs([g.op("qlinear", x, w, s, None, None, activation=None)])
    (got,) = get_target("onnxruntime").build(g)([torch.eye(k)])
    want = dequantize(pack_codes(codes, bits), scales, None, qt).t()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)  # 8 bits: ~1e-5 rounding
    # the default zero point (8 / 128) is ORT's own: no zero_points input was emitted
    (node,) = _ms_nodes(get_target("onnxruntime").build(g).model_proto, "MatMulNBits")
    assert len([i for i in node.input if i]) == 3


def test_packed_zero_points_layout():
    """Asymmetric 4-bit: zero points two per byte, low nibble first, odd block counts padded
    per row; the B input is our storage reshaped."""
    g = _qlinear_graph("int4 g32 asym k96")  # 3 blocks per row: padded to 2 bytes
    prog = OrtProgram(g)
    (node,) = _ms_nodes(prog.model_proto, "MatMulNBits")
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in prog.model_proto.graph.initializer}
    zp, w = inits[node.input[3]], g.constants["w"]
    # RTN's zeros are fractional: MatMulNBits takes them rounded (the rest is added exactly)
    zeros = g.constants["w_zeros"].const.round().clamp(0, 15).to(torch.uint8)
    assert zp.shape == (40, 2) and zp.dtype == np.uint8
    assert (zp[:, 0] == (zeros[:, 0] | zeros[:, 1] << 4).numpy()).all()
    assert (zp[:, 1] == zeros[:, 2].numpy()).all()
    assert (inits[node.input[1]] == w.const.reshape(40, 3, 16).numpy()).all()


@pytest.mark.parametrize("qtext, bs", [("int4 g576 sym k576", 64), ("int8 g768 sym k768", 32),
                                        ("int8 g100 asym k100", 32), ("int8 g48 sym k48", 16),
                                        ("int4 g100 sym k100", 128), ("int4 g40 sym k40", 64),
                                        ("int4 g32 sym k64", 32), ("int4 g256 sym k512", 128),
                                        ("int4 g48 sym k96", 16), ("int4 g40 sym k80", None)])
def test_block_size(qtext, bs):
    qt = QuantType.parse(qtext)
    assert quant.block_size(qt) == bs
    reason = get_target("onnxruntime").quant_unsupported(qt, "qlinear")
    assert (reason is None) == (bs is not None)
    if bs is None:
        assert "group 40" in reason and "multiple of 16" in reason


@pytest.mark.parametrize("act_quant", ["tensor", "token"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "standard-ops"])
def test_qmatmul_is_exact(act_quant, fused):
    g = _qmatmul_graph(act_quant=act_quant)
    prog = OrtProgram(g, fused=fused)
    x = torch.randn(2, 3, 96)
    x[1] *= 10.0  # one row far wider than the others: per-token and per-tensor differ
    got, want = prog([x]), interpret(g, [x])
    for a, b in zip(got, want):
        assert _rel(a, b) < EXACT_RTOL
    ops = prog.onnx_ops
    if fused and act_quant == "tensor":
        assert ops["com.microsoft.DynamicQuantizeMatMul"] == 2
        inits = {t.name: onnx.numpy_helper.to_array(t) for t in prog.model_proto.graph.initializer}
        for node in _ms_nodes(prog.model_proto, "DynamicQuantizeMatMul"):
            w, zp = inits[node.input[1]], inits[node.input[3]]
            assert w.dtype == np.uint8 and w.shape == (96, 40)  # u8 [K, N], never s8
            assert zp.dtype == np.uint8 and (zp == 128).all()
    elif fused:  # per token: MatMulIntegerToFloat after one quantization of x
        assert ops["com.microsoft.MatMulIntegerToFloat"] == 2 and ops["ReduceMax"] == 1
    else:
        assert ops["MatMulInteger"] == 2 and ops["ReduceMax"] == 1
        assert not any(k.startswith("com.microsoft") for k in ops)


def test_qmatmul_all_zero_rows():
    """A row of zeros (scale 1, every code at the zero point) gives the bias, per token."""
    g = _qmatmul_graph(act_quant="token")
    x = torch.randn(1, 3, 96)
    x[0, 1] = 0.0
    got, want = OrtProgram(g)([x]), interpret(g, [x])
    for a, b in zip(got, want):
        assert _rel(a, b) < EXACT_RTOL


def test_target_questions():
    t = get_target("onnxruntime")
    assert t.qmatmul_act_quant == ("token", "tensor")  # both exact; per token first
    fp8 = QuantType("fp8e4m3", 8, 64, True, 64)
    assert "GPU" in t.quant_unsupported(fp8, "qlinear")
    assert "int8 symmetric per-channel" in t.quant_unsupported(
        QuantType.parse("int8 g32 sym k64"), "qmatmul")
    assert t.quant_unsupported(QuantType.parse("int8 g64 sym k64"), "qmatmul") is None


def test_fp8_is_refused_with_the_reason():
    qt = QuantType("fp8e4m3", 8, 64, True, 64)
    q = quantize_rtn(torch.randn(16, 64), qt)
    g = Graph("fp8")
    x = g.add_input("x", TensorType(DType.f32, (2, 64)))
    w = g.add_constant(q.qweight, "w", quant=qt)
    s = g.add_constant(q.scales, "s")
    g.set_outputs([g.op("qlinear", x, w, s, None, None, activation=None)])
    with pytest.raises(LoweringError, match="fp8e4m3 needs a GPU target"):
        get_target("onnxruntime").build(g)


def test_weights_from_an_input_are_refused():
    qt = QuantType.parse("int4 g32 sym k64")
    g = Graph("dyn")
    x = g.add_input("x", TensorType(DType.f32, (2, 64)))
    w = g.add_input("w", qt.storage_type(16))
    s = g.add_constant(torch.rand(16, 2), "s")
    g.set_outputs([g.op("qlinear", x, w, s, None, None, activation=None)])
    with pytest.raises(LoweringError, match="quantized weight must be a constant"):
        get_target("onnxruntime").build(g)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "standard-ops"])
def test_export_runs_in_plain_onnxruntime(fused, tmp_path):
    """The exported file (weights inside) runs in a bare InferenceSession and equals the
    program; standard ops only: no com.microsoft node, the exact dequantized product."""
    g = _qlinear_graph("int4 g32 asym k64", bias=True, act="gelu")
    x = torch.randn(2, 3, 64)
    path = save_model(export_graph(g, fused=fused), tmp_path / "q.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {"x": x.numpy()})
    (want,) = OrtProgram(g, fused=fused)([x])
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-6, atol=1e-6)
    domains = {n.domain for n in onnx.load(str(path)).graph.node}
    assert ("com.microsoft" in domains) == fused
    if not fused:
        assert _rel(torch.from_numpy(got), interpret(g, [x])[0]) < EXACT_RTOL


# -- a generation step with quantized projections ------------------------------------------

H, D, SLOTS, LEN = 2, 16, 2, 12
E = H * D


def _step_graph() -> Graph:
    """h [1, n, E] -> qlinear q/k/v (int4 sym, int4 asym, int8) -> cached_attention (bshd,
    one head-major slot per sequence) -> qlinear o (int4 g16, bias)."""
    g = Graph("step")
    h = g.add_input("h", TensorType(DType.f32, (1, "n", E)))
    cache_t = TensorType(DType.f32, (SLOTS, LEN, H, D))
    kc, vc = g.add_input("kc", cache_t), g.add_input("vc", cache_t)
    pos, sot = (g.add_input(nm, TensorType(DType.i64, ("n",))) for nm in ("pos", "sot"))
    lens, table = (g.add_input(nm, TensorType(DType.i64, ("b",))) for nm in ("lens", "table"))
    heads = []
    for name, qtext in (("q", f"int4 g32 sym k{E}"), ("k", f"int4 g16 asym k{E}"),
                        ("v", f"int8 g{E} sym k{E}")):
        w, s, z = _quantized(g, E, QuantType.parse(qtext), name=name)
        y = g.op("qlinear", h, w, s, z, None, activation=None)
        heads.append(g.op("reshape", y, shape=[1, g.inputs[0].type.shape[1], H, D]))
    att = g.op("cached_attention", *heads, kc, vc, pos, sot, lens, table, layout="bshd",
               kv_heads=H)
    flat = g.op("reshape", att, shape=[1, g.inputs[0].type.shape[1], E])
    w, s, z = _quantized(g, E, QuantType.parse(f"int4 g16 sym k{E}"), name="o")
    g.set_outputs([g.op("qlinear", flat, w, s, z, g.add_constant(torch.randn(E), "o_bias"),
                        activation=None)])
    return g


@pytest.mark.parametrize("level, rtol", [(4, 0.05), (0, 1e-5)])
def test_generation_step_with_qlinear(level, rtol, monkeypatch):
    """Level 0 is exact; level 4's int8 activation blocks cost 1-3% on these random
    activations, compounded over the step's layers."""
    monkeypatch.setattr(quant, "ACCURACY_LEVEL", level)
    g = _step_graph()
    program = get_target("onnxruntime").build(g)
    assert isinstance(program, GenerationOrtProgram)
    assert sum(n.op_type == "MatMulNBits" for n in program.model_proto.graph.node) == 4
    ours = [torch.zeros(SLOTS, LEN, H, D) for _ in range(2)]
    ref = [torch.zeros(SLOTS, LEN, H, D) for _ in range(2)]
    gen = torch.Generator().manual_seed(1)
    # prefill 5 and 3 tokens, then two decode steps of both sequences
    for starts, counts in (([0, 0], [5, 3]), ([5, 3], [1, 1]), ([6, 4], [1, 1])):
        n = sum(counts)
        pos = torch.cat([torch.arange(a, a + c) for a, c in zip(starts, counts)])
        sot = torch.cat([torch.full((c,), i) for i, c in enumerate(counts)])
        lens = torch.tensor([a + c for a, c in zip(starts, counts)])
        table = torch.tensor([1, 0])
        h = torch.randn(1, n, E, generator=gen)
        (got,) = program([h, *ours, pos, sot, lens, table])
        (want,) = interpret(g, [h, *ref, pos, sot, lens, table])
        assert _rel(got, want) < rtol
    for a, b in zip(ours, ref):
        assert _rel(a, b) < rtol and a.abs().sum() > 0  # the caches were written


# -- end to end: optimize(quantize=...) then export_onnx -----------------------------------


def _tiny_llama():
    import transfuse.models as models
    from transfuse.models._common import init_weights

    model = models.llama("tiny", seed=0)
    init_weights(model, seed=1, std=0.3)
    return model.eval()


@pytest.mark.parametrize("target, spec, kernel", [
    ("onnxruntime", {"scheme": "int4-weight", "symmetric": False, "group": 16}, "MatMulNBits"),
    ("python", {"scheme": "w8a8", "smoothquant": 0}, "MatMulIntegerToFloat"),
], ids=["ort-int4-asym", "python-w8a8-token"])
def test_export_of_a_quantized_model_runs_in_plain_onnxruntime(target, spec, kernel, tmp_path):
    """The file of a quantized compiled model runs in a bare InferenceSession and computes what
    the compiled model does: the ORT target's own kernels, and a python-target W8A8 model (per
    token activations: quantization written out, MatMulIntegerToFloat) to f32 rounding."""
    import transfuse

    model, ids = _tiny_llama(), torch.randint(0, 1000, (1, 12))
    q = transfuse.optimize(model, (ids,), quantize=spec, target=target)
    path = q.export_onnx(str(tmp_path / "q.onnx"))
    counts = {}
    for n in onnx.load(path).graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    assert counts.get(kernel, 0) == sum(q.graph.op_histogram()[op] for op in ("qlinear",
                                                                              "qmatmul"))
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {sess.get_inputs()[0].name: ids.numpy()})
    with torch.no_grad():
        want = q(ids)
    assert _rel(torch.from_numpy(got), want) < EXACT_RTOL
