"""The quantized-weight IR: QuantType, packing, RTN, dequantization, qlinear / qmatmul."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from transfuse.errors import IRVerifyError
from transfuse.ir.graph import Graph
from transfuse.ir.interpret import interpret
from transfuse.ir.parser import parse_graph
from transfuse.ir.quant import (
    QuantizedWeight,
    dequantize,
    dynamic_quantize_u8,
    pack_codes,
    quant_params,
    quantize_codes,
    quantize_rtn,
    sqnr_db,
    unpack_codes,
)
from transfuse.ir.types import QuantType, TensorType
from transfuse.ir.verify import verify


def qt(text: str) -> QuantType:
    return QuantType.parse(text)


# -- QuantType ------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["int4 g64 asym k576", "int8 g576 sym k576",
                                  "int4 g32 sym k64", "fp8e4m3 g128 sym k128"])
def test_quant_type_text_round_trip(text):
    t = qt(text)
    assert str(t) == text and QuantType.parse(str(t)) == t


def test_quant_type_derived():
    t = qt("int4 g64 asym k576")
    assert (t.groups, t.packed_k, t.levels, t.default_zero, t.per_channel) == (9, 288, 16, None,
                                                                               False)
    s = qt("int8 g576 sym k576")
    assert (s.groups, s.packed_k, s.default_zero, s.per_channel) == (1, 576, 128, True)


@pytest.mark.parametrize("args, why", [
    (("int", 4, 128, False, 576), "does not divide K=576"),
    (("int", 3, 64, False, 576), "4 or 8 bits"),
    (("int", 4, 0, False, 576), "group must be a positive int"),
    (("fp8e4m3", 8, 64, True, 128), "one scale per output channel"),
    (("int2", 4, 64, True, 128), "scheme must be one of"),
])
def test_quant_type_rejects(args, why):
    with pytest.raises(IRVerifyError, match=why):
        QuantType(*args)


def test_quant_type_parse_error():
    with pytest.raises(IRVerifyError, match="cannot parse quant type"):
        QuantType.parse("int4 64 asym")


def test_tensor_type_with_quant():
    t = TensorType.parse("u8{int4 g64 asym k576}[96, 288]")
    assert t.quant == qt("int4 g64 asym k576")
    assert str(t) == "u8{int4 g64 asym k576}[96, 288]"
    assert t != TensorType.parse("u8[96, 288]") and t.storage() == TensorType.parse("u8[96, 288]")
    with pytest.raises(IRVerifyError, match=r"stored as u8\[N, 288\]"):
        TensorType.parse("u8{int4 g64 asym k576}[96, 576]")


# -- packing and RTN ------------------------------------------------------------------------


def test_pack_nibble_order():
    codes = torch.tensor([[1, 2, 3, 4]], dtype=torch.uint8)
    packed = pack_codes(codes, 4)
    assert packed.tolist() == [[0x21, 0x43]]  # element 2j in the low nibble of byte j
    assert torch.equal(unpack_codes(packed, 4, 4), codes)
    assert torch.equal(pack_codes(codes, 8), codes)


def test_pack_round_trip_random():
    codes = torch.randint(0, 16, (7, 64), dtype=torch.uint8)
    assert torch.equal(unpack_codes(pack_codes(codes, 4), 4, 64), codes)
    with pytest.raises(IRVerifyError, match="u8"):
        pack_codes(codes.to(torch.int32), 4)


@pytest.mark.parametrize("text, min_db", [("int8 g64 sym k128", 38), ("int8 g128 asym k128", 38),
                                          ("int4 g32 asym k128", 17), ("int4 g32 sym k128", 16),
                                          ("fp8e4m3 g128 sym k128", 28)])
def test_rtn_error_and_storage(text, min_db):
    t = qt(text)
    w = torch.randn(48, 128)
    q = quantize_rtn(w, t)
    assert q.qweight.dtype == t.storage_dtype.torch and q.qweight.shape == (48, t.packed_k)
    assert q.scales.shape == (48, t.groups)
    assert (q.zeros is None) == t.symmetric
    assert sqnr_db(w, q.dequantize()) > min_db
    # RTN is the nearest point of the grid: the error per element is at most half a step
    if t.scheme == "int":
        step = q.scales.repeat_interleave(t.group, dim=1)
        assert ((q.dequantize() - w).abs() <= step / 2 + 1e-6).all()


def test_rtn_lands_back_on_its_own_grid():
    t = qt("int4 g32 asym k64")
    w = quantize_rtn(torch.randn(16, 64), t).dequantize()
    again = quantize_rtn(w, t).dequantize()
    assert torch.allclose(again, w, atol=1e-5)


def test_dequantize_formula():
    t = qt("int4 g2 asym k4")
    codes = torch.tensor([[0, 15, 8, 9]], dtype=torch.uint8)
    scales = torch.tensor([[0.5, 2.0]])
    zeros = torch.tensor([[1.0, 8.0]])
    w = dequantize(pack_codes(codes, 4), scales, zeros, t)
    assert w.tolist() == [[-0.5, 7.0, 0.0, 2.0]]
    sym = qt("int4 g2 sym k4")
    assert dequantize(pack_codes(codes, 4), scales, None, sym).tolist() == [[-4.0, 3.5, 0.0, 2.0]]


def test_zero_group_and_clip():
    t = qt("int4 g4 asym k8")
    w = torch.zeros(2, 8)
    w[1, 4:] = torch.tensor([1.0, -1.0, 0.5, 0.25])
    q = quantize_rtn(w, t)
    assert torch.equal(q.dequantize()[0], torch.zeros(8))  # an all-zero group stays zero
    s_full, _ = quant_params(w, t)
    s_clip, _ = quant_params(w, t, clip=0.5)
    assert torch.allclose(s_clip[1, 1], s_full[1, 1] * 0.5)


def test_quantized_weight_checks_storage():
    t = qt("int4 g32 asym k64")
    q = quantize_rtn(torch.randn(4, 64), t)
    with pytest.raises(IRVerifyError, match="zeros must be"):
        QuantizedWeight(q.qweight, q.scales, None, t)
    with pytest.raises(IRVerifyError, match="scales must be"):
        QuantizedWeight(q.qweight, q.scales[:, :1], q.zeros, t)


def test_quantize_codes_clamps():
    t = qt("int8 g4 sym k4")
    scales = torch.tensor([[0.01]])
    codes = quantize_codes(torch.tensor([[10.0, -10.0, 0.0, 0.01]]), scales, None, t)
    assert codes.tolist() == [[255, 0, 128, 129]]


def test_sqnr():
    a = torch.ones(10)
    assert sqnr_db(a, a) == math.inf
    assert abs(sqnr_db(a, a * 1.1) - 20.0) < 1e-5  # 1.1 in f32


def test_dynamic_quantize_matches_onnx_rule():
    x = torch.tensor([[-1.0, 0.5, 2.0], [0.2, 0.4, 0.6]])
    q, s, z = dynamic_quantize_u8(x, per_row=True)
    assert torch.allclose(s[:, 0], torch.tensor([3.0 / 255, 0.6 / 255]))
    assert z[:, 0].tolist() == [85.0, 0.0]
    assert torch.allclose((q.float() - z) * s, x, atol=float(s.max()) / 2 + 1e-7)
    q, s, z = dynamic_quantize_u8(x, per_row=False)
    assert s.dim() == 0 and float(z) == 85.0
    q, s, z = dynamic_quantize_u8(torch.zeros(2, 3), per_row=False)  # no range: all zero point
    assert ((q.float() - z) * s).abs().max() == 0


# -- the ops --------------------------------------------------------------------------------


def _qlinear_graph(t: QuantType, n: int, bias: bool = False, activation: str | None = None):
    w = torch.randn(n, t.k)
    q = quantize_rtn(w, t)
    g = Graph()
    x = g.add_input("x", TensorType.parse(f"f32[batch, {t.k}]"))
    wv = g.add_constant(q.qweight, "w", quant=t)
    s = g.add_constant(q.scales, "s")
    z = None if q.zeros is None else g.add_constant(q.zeros, "z")
    b = g.add_constant(torch.randn(n), "b") if bias else None
    g.set_outputs([g.op("qlinear", x, wv, s, z, b, activation=activation)])
    return g, q, b


@pytest.mark.parametrize("text", ["int4 g32 asym k64", "int8 g64 sym k64",
                                  "fp8e4m3 g64 sym k64"])
def test_qlinear_reference(text):
    g, q, b = _qlinear_graph(qt(text), 24, bias=True, activation="gelu")
    verify(g)
    x = torch.randn(5, 64)
    got = interpret(g, [x])[0]
    want = F.gelu(F.linear(x, q.dequantize(), b.const))
    assert torch.allclose(got, want, atol=1e-5)


def test_qlinear_text_round_trip():
    g, _, _ = _qlinear_graph(qt("int4 g32 asym k64"), 8)
    text = str(g)
    assert "u8{int4 g32 asym k64}[8, 32]" in text
    g2 = parse_graph(text, constants={n: v.const for n, v in g.constants.items()})
    verify(g2)
    assert str(g2) == text
    x = torch.randn(3, 64)
    assert torch.equal(interpret(g, [x])[0], interpret(g2, [x])[0])


def test_qlinear_rejects_inconsistent_inputs():
    t = qt("int4 g32 asym k64")
    q = quantize_rtn(torch.randn(8, 64), t)
    g = Graph()
    x = g.add_input("x", TensorType.parse("f32[2, 64]"))
    wv = g.add_constant(q.qweight, "w", quant=t)
    s = g.add_constant(q.scales, "s")
    with pytest.raises(IRVerifyError, match="needs zeros"):
        g.op("qlinear", x, wv, s)
    plain = g.add_constant(q.qweight.clone(), "plain")
    with pytest.raises(IRVerifyError, match="has no quant type"):
        g.op("qlinear", x, plain, s)
    x2 = g.add_input("x2", TensorType.parse("f32[2, 32]"))
    with pytest.raises(IRVerifyError, match="K=64"):
        g.op("qlinear", x2, wv, s, g.add_constant(q.zeros, "z"))


def test_parse_rejects_mismatched_quant_payload():
    t = qt("int4 g32 asym k64")
    q = quantize_rtn(torch.randn(8, 64), t)
    text = "graph g(%x: f32[2, 64]) {\n  const %w: u8{int4 g32 asym k64}[8, 32]\n  return %w\n}"
    with pytest.raises(Exception, match="declared"):
        parse_graph(text, constants={"w": q.qweight.to(torch.int8)})


@pytest.mark.parametrize("act", ["token", "tensor"])
def test_qmatmul_reference(act):
    t = qt("int8 g64 sym k64")
    w = torch.randn(16, 64)
    q = quantize_rtn(w, t)
    g = Graph()
    x = g.add_input("x", TensorType.parse("f32[batch, 64]"))
    y = g.op("qmatmul", x, g.add_constant(q.qweight, "w", quant=t), g.add_constant(q.scales, "s"),
             None, act_quant=act)
    g.set_outputs([y])
    verify(g)
    xs = torch.randn(4, 64) * torch.tensor([1.0, 10.0, 0.1, 3.0])[:, None]
    got = interpret(g, [xs])[0]
    xq, sx, zx = dynamic_quantize_u8(xs, per_row=act == "token")
    want = F.linear((xq.float() - zx) * sx, q.dequantize())
    assert torch.allclose(got, want, atol=1e-4)
    assert sqnr_db(F.linear(xs, w), got) > 30


def test_qmatmul_needs_int8_per_channel():
    t = qt("int4 g32 sym k64")
    q = quantize_rtn(torch.randn(8, 64), t)
    g = Graph()
    x = g.add_input("x", TensorType.parse("f32[2, 64]"))
    y = g.op("qmatmul", x, g.add_constant(q.qweight, "w", quant=t), g.add_constant(q.scales, "s"))
    g.set_outputs([y])
    with pytest.raises(IRVerifyError, match="int8 symmetric per channel"):
        verify(g)


def test_interpret_observe_sees_every_node():
    g, _, _ = _qlinear_graph(qt("int8 g64 sym k64"), 8)
    seen = []
    interpret(g, [torch.randn(2, 64)], observe=lambda n, a, o: seen.append((n.op, a[0].shape)))
    assert seen == [("qlinear", torch.Size([2, 64]))]
